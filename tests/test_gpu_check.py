"""tools/gpu_check.py --cpu-smoke: every check runs (reduced, on CPU) and passes; the report is written."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_smoke(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--cpu-smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    checks = report["checks"]
    assert report["cpu_smoke"] and set(checks) == {"bf16_numerics", "fast_path", "device_exactness", "engines", "memory"}
    assert all(c["ok"] for c in checks.values())
    fast = checks["fast_path"]
    assert 0 < fast["worst_grad_rel"] <= 1e-5 and fast["min_clipped_fraction"] > 0
    assert 1e-4 < checks["bf16_numerics"]["worst_rel"] < 2e-2  # bf16 differs from fp32, but not by much
    single = checks["engines"]["rows"]["single"]
    assert single["resumed"]["steps"] == [3, 8] and single["resume_bit_identical"] and single["n_trainable"] > 0
    assert single["uninterrupted"]["dtypes"]["trainable"] == ["torch.float32"]
    assert single["cpu_rebuild_fingerprint"] == "match"  # export's frozen-state check on the trained checkpoint
    assert all(r["fold_codes_equal"] for r in checks["device_exactness"]["rows"])
    mem = checks["memory"]["rows"][0]  # planner vs the measured peak RSS of two CPU steps
    assert mem["measured_rss_gib"] > 0 and abs(mem["err_measured"]) <= 0.10
    assert "| fast_path | True |" in (tmp_path / "report.md").read_text()
