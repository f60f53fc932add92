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
        assert cfg.train.output_dir.endswith(f"{setting}/{method}")
    assert len(budgets) == 1  # same data, token budget and seed for every trained row
    assert next(iter(budgets))[:5] == (25, 4, 1, 128, 0)


def test_no_row_uses_4bit_groups_of_32():
    # SmolLM2's GGUF weights sit on a Q4_1 g32 grid: such a row would be meaningless.
    assert not any(q["bits"] == 4 and q["group_size"] == 32 for q in bench.SETTINGS.values())


def test_table_reports_the_recovered_gap(tmp_path):
    def row(setting, method, ppl, trained=False):
        r = {"setting": setting, "method": method, "ppl": ppl, "trained": trained}
        if trained:
            r.update(first_loss=3.5, last_loss=3.0, tokens=1024)
        (tmp_path / f"{setting}__{method}.json").write_text(json.dumps(r))

    row("w4pc", "fp", 10.0)
    row("w4pc", "rtn", 30.0)
    row("w4pc", "lrqat-fixed", 15.0, trained=True)
    row("w3pc", "rtn", 50.0)
    row("w3pc", "peqa", 60.0, trained=True)
    text = bench.table(tmp_path)
    assert "| lrqat-fixed | 15.000 | 75% | 3.500 -> 3.000 | 1,024 |" in text
    assert "| peqa | 60.000 | -25% |" in text  # worse than RTN is shown, not hidden
    assert text.index("**w4pc**") < text.index("**w3pc**")
