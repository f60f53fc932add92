"""tools/bench_quality.py: every row is a valid training job, and the table computes the gap honestly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lrqat_dist.train import load_config
from tools import bench_quality as bench

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("setting", list(bench.SETTINGS))
def test_every_row_is_a_valid_job_with_the_same_budget(setting, tmp_path):
    args = bench.parser().parse_args(["--row", f"{setting}/rtn", "--steps", "25"])
    budgets = set()
    for method, spec in bench.METHODS.items():
        if spec is None:
            continue
        cfg = load_config(bench.RECIPE, overrides=bench.row_overrides(setting, method, args, tmp_path / "m",
                                                                      tmp_path / "c"))
        want = bench.row_quant(setting, method, args.steps)
        assert cfg.quant.method == want["method"] and cfg.quant.bits == want["bits"]
        assert cfg.quant.group_size == want["group_size"] and cfg.quant.symmetric == want["symmetric"]
        assert (cfg.quant.activations is None) == ("activations" not in want)
        for key, value in spec[1].items():  # per-method learning rates reach the trainer
            assert getattr(cfg.train, key) == value
        budgets.add((cfg.train.max_steps, cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.data.seq_len,
                     cfg.train.seed, cfg.model.path, str(cfg.data.train_files)))
        assert cfg.train.output_dir.endswith(f"{setting}/{method}/s0")
        assert cfg.train.val_every == 25  # validation stream loss at the start and the end
        kd = bench.KD_TEACHERS.get(method)
        assert cfg.train.distill.enabled == (kd is not None)
        if kd is not None:
            assert cfg.train.distill.teacher == ("phi0" if kd == "phi0" else str(tmp_path / "m"))
            assert (cfg.train.distill.weight, cfg.train.distill.temperature) == (bench.KD_WEIGHT, bench.KD_TEMPERATURE)
    assert len(budgets) == 1  # same data, token budget and seed for every trained row
    assert next(iter(budgets))[:5] == (25, 4, 1, 128, 0)


def test_no_row_uses_4bit_groups_of_32():
    # SmolLM2's GGUF weights sit on a Q4_1 g32 grid: such a row would be meaningless.
    assert not any(q["bits"] == 4 and q["group_size"] == 32 for q in bench.SETTINGS.values())


def test_table_reports_the_recovered_gap(tmp_path):
    def row(setting, method, ppl, trained=False, seed=None, val=None):
        r = {"setting": setting, "method": method, "ppl": ppl, "trained": trained}
        if trained:
            r.update(first_loss=3.5, last_loss=3.0, tokens=1024)
        if val is not None:
            r["val_loss"] = val
        name = f"{setting}__{method}.json" if seed is None else f"{setting}__{method}__s{seed}.json"
        (tmp_path / name).write_text(json.dumps(r if seed is None else {**r, "seed": seed}))

    row("w4pc", "fp", 10.0)  # old file names: read as seed 0
    row("w4pc", "rtn", 30.0)
    row("w4pc", "lrqat-fixed", 15.0, trained=True)
    row("w3pc", "rtn", 50.0)
    row("w3pc", "peqa", 60.0, trained=True)
    text = bench.table(tmp_path)
    assert "| lrqat-fixed | 1 | 15.000 | 75% |  | 3.500 -> 3.000 | 1,024 |" in text
    assert "| peqa | 1 | 60.000 | -25% |" in text  # worse than RTN is shown, not hidden
    assert text.index("**w4pc**") < text.index("**w3pc**")

    # seeds: the new-form seed-0 file replaces the old one; mean and min-max over the seeds, and n
    row("w4pc", "lrqat-fixed", 16.0, trained=True, seed=0, val=3.1)
    row("w4pc", "lrqat-fixed", 20.0, trained=True, seed=1, val=3.3)
    row("w4pc", "lrqat-fixed+kd", 12.0, trained=True, seed=2, val=3.0)
    text = bench.table(tmp_path)
    assert "| lrqat-fixed | 2 | 18.000 (16.000-20.000) | 60% | 3.200 (3.100-3.300) | 3.500 -> 3.000 | 1,024 |" in text
    assert "| lrqat-fixed+kd | 1 | 12.000 | 90% | 3.000 |" in text
    assert "15.000" not in text


def test_seeds_and_kd_options_get_their_own_files_and_dirs(tmp_path):
    p = bench.parser()
    a = p.parse_args(["--row", "w4pc/lrqat-fixed+kd", "--seed", "3"])
    b = p.parse_args(["--row", "w4pc/lrqat-fixed+kd", "--seed", "3", "--kd-weight", "0.5", "--kd-temperature", "2"])
    assert bench.result_path("w4pc", "lrqat-fixed+kd", a, tmp_path).name == "w4pc__lrqat-fixed+kd__s3.json"
    assert bench.result_path("w4pc", "lrqat-fixed+kd", b, tmp_path).name == "w4pc__lrqat-fixed+kd@w0.5-T2__s3.json"
    assert bench.result_path("w4pc", "lrqat-fixed", b, tmp_path).name == "w4pc__lrqat-fixed__s3.json"
    cfg = load_config(bench.RECIPE, overrides=bench.row_overrides("w4pc", "lrqat-fixed+kd", b, tmp_path, tmp_path))
    assert cfg.train.output_dir.endswith("w4pc/lrqat-fixed+kd@w0.5-T2/s3") and cfg.train.seed == 3
    assert (cfg.train.distill.weight, cfg.train.distill.temperature) == (0.5, 2.0)
