"""tools/bench_speed.py --quick: every variant of both case kinds runs and gets a ratio to LoRA."""
import json

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
