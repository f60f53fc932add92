"""tools/bench_speed.py --quick: every variant of both case kinds runs and gets a ratio to LoRA."""
import json

import pytest

from tools import bench_speed as bench


def test_bench_speed_quick(tmp_path):
    out = tmp_path / "r.json"
    assert bench.main(["--quick", "--json", str(out), "--markdown", str(tmp_path / "r.md")]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["case"] for r in results] == ["linear-256x128-64", "model-tiny-2x32"]
    for res in results:
        rows = {r["variant"]: r for r in res["rows"]}
        assert set(rows) == set(bench.ALL) and "lrqat-q4.4-compiled" not in rows  # on request only
        assert rows["lora"]["ratio_to_lora"] == 1.0
        assert all(r["median_s"] > 0 for r in rows.values())
    assert "| linear-256x128-64 | lora |" in (tmp_path / "r.md").read_text()


def test_bench_speed_dlqat_variants_on_request_single_linears_only(tmp_path):
    out = tmp_path / "r.json"
    assert bench.main(["--quick", "--cases", "linear-256x128-64", "--variants", "dlqat,dlqat-autograd",
                       "--json", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"][0]["rows"]}
    assert set(rows) == {"lora", "dlqat", "dlqat-autograd"}
    assert rows["dlqat"]["clipped_fraction"] > 0 and all(r["median_s"] > 0 for r in rows.values())
    assert "dlqat" not in bench.ALL
    with pytest.raises(ValueError, match="single linears only"):
        bench.main(["--quick", "--cases", "model-tiny-2x32", "--variants", "dlqat"])
