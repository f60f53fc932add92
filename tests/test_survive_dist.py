"""Two processes (torchrun, gloo): runs that survive preemption, a killed rank, NaN steps, an unshared
output directory (issue 13). The scenarios run in tests/dist/survive_worker.py (see its docstring).

- SIGTERM as SLURM and launchers send it, with ``data.num_workers: 2`` (FSDP2, real tokenizer and
  streaming data): every process group (each trainer's with its DataLoader workers, then torchrun's)
  gets SIGTERM at step >= 3, so each trainer is signalled twice (directly and forwarded by torchrun). The
  run saves and stops at the same step on both ranks; resumed, it ends bit-identical to an
  uninterrupted run (every loss, the final trainable tensors).
- kill -9 of rank 1 inside the save of step 4 (DeepSpeed ZeRO-2): step 2 stays the newest complete
  checkpoint, the half-written one is never taken, and the resumed run ends bit-identical to an
  uninterrupted one.
- NaN logits at step 3 on rank 1 only, for DeepSpeed ZeRO-0/2/3 (2 and 3 also with the optimizer
  offloaded) and FSDP2: both ranks skip step 3 (the
  trainable tensors after step 3 equal those after step 2), count it, and train on; a run of NaNs stops
  with the named error on both ranks.
- ``train.save_every_minutes`` due on rank 1 only: both ranks save the same step.
- Per-rank output directories: the shared-directory check fails on both ranks, naming the rank that
  does not see rank 0's nonce; the checkpoint-completion check names the file rank 0 cannot see.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train_common import series

from lrqat_dist.checkpoint import list_checkpoints
from test_train_single import smollm2_tokenizer  # noqa: F401  (the fixture)

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests/dist/survive_worker.py"
NAN_ENGINES = ["nan_ds0", "nan_ds2", "nan_ds3", "nan_ds2off", "nan_ds3off", "nan_fsdp2"]

pytestmark = pytest.mark.slow


def _launch(root: Path, jobs: str, tokenizer: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(root), "--jobs", jobs] + (["--tokenizer", tokenizer] if tokenizer else [])
    return subprocess.Popen(cmd, env=env, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group, as under a batch scheduler


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not cond():
        if proc.poll() is not None or time.time() > deadline:
            out = proc.communicate(timeout=60)[0] if proc.poll() is None or proc.stdout else ""
            raise AssertionError(f"condition not reached (rc={proc.returncode}):\n{out[-6000:]}")
        time.sleep(0.1)


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            pass
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, smollm2_tokenizer):  # noqa: F811
    root = tmp_path_factory.mktemp("survive")
    logs = {}
    # 1. SIGTERM to every process group at step >= 3, data workers running.
    proc = _launch(root, "sigterm:first", smollm2_tokenizer)
    _wait_for(lambda: max(series(root / "sigterm"), default=0) >= 3 if (root / "sigterm/metrics.jsonl").exists()
              else False, proc)
    for pid in _children(proc.pid):  # each trainer's group (trainer + its DataLoader workers), as SLURM does
        os.killpg(pid, signal.SIGTERM)
    time.sleep(0.1)  # (two signals at once would be merged into one by the OS / Python)
    os.killpg(proc.pid, signal.SIGTERM)  # torchrun's group: torchrun forwards it to each trainer's group again
    logs["sigterm"] = proc.communicate(timeout=120)[0]
    # 2. kill -9 of rank 1 while it is inside the save of step 4.
    proc = _launch(root, "kill9:first")
    marker = root / "kill9/KILL_ME"
    _wait_for(marker.exists, proc)
    os.kill(int(marker.read_text()), signal.SIGKILL)
    logs["kill9"] = proc.communicate(timeout=120)[0]
    logs["kill9_rc"] = proc.returncode
    logs["kill9_after"] = {"dirs": sorted(p.name for p in (root / "kill9/checkpoints").iterdir()),
                           "complete": [s for s, _ in list_checkpoints(root / "kill9")]}
    # 3. Resume both, the uninterrupted references, the NaN runs and the shared-directory checks.
    proc = _launch(root, ",".join(["sigterm:resume", "sigterm_ref", "kill9:resume", "kill9_ref", *NAN_ENGINES,
                                   "nanrun", "timed", "sharedfs"]), smollm2_tokenizer)
    logs["rest"] = proc.communicate(timeout=900)[0]
    for name, text in logs.items():
        (root / f"{name}.log").write_text(str(text))
    assert proc.returncode == 0, logs["rest"][-8000:]
    return root, logs


def _result(root: Path, name: str) -> dict:
    return json.loads((root / name).read_text())


def _trainable(run: Path, step: int) -> dict:
    return load_file(run / f"checkpoints/step_{step:08d}/trainable.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_to_every_process_group_with_data_workers_saves_and_resumes_exactly(runs):
    root, logs = runs
    log = logs["sigterm"]
    first = _result(root, "sigterm/result_first.json")
    stopped = first["step"]
    assert first["preempted"] and 3 <= stopped < 12, log[-5000:]
    assert "DataLoader worker" not in log and "exited unexpectedly" not in log, log[-5000:]
    assert "received SIGTERM again: still saving" in log  # signalled twice; the second did not kill it
    assert first["checkpoint"].endswith(f"step_{stopped:08d}")
    second = _result(root, "sigterm/result_resume.json")
    assert second["step"] == 12 and not second["preempted"]
    assert [s for s, _ in list_checkpoints(root / "sigterm")] == [stopped, 12]
    cut, ref = series(root / "sigterm"), series(root / "sigterm_ref")
    assert sorted(cut) == list(range(1, 13)) and cut == ref  # exact, every step
    assert _same(_trainable(root / "sigterm", 12), _trainable(root / "sigterm_ref", 12))


def test_kill_9_of_one_rank_during_a_save_leaves_the_previous_checkpoint_resumable(runs):
    root, logs = runs
    assert logs["kill9_rc"] != 0, logs["kill9"][-3000:]
    assert not (root / "kill9/result_first.json").exists()  # the first launch never finished
    second = _result(root, "kill9/result_resume.json")
    assert second["step"] == 6
    # The step-4 save was cut short: its temp dir is not a checkpoint, step 2 is the newest complete one,
    # so the resume started there and trained steps 3.. again, exactly.
    assert logs["kill9_after"] == {"dirs": [".tmp_step_00000004", "step_00000002"], "complete": [2]}
    assert series(root / "kill9") == series(root / "kill9_ref")
    assert _same(_trainable(root / "kill9", 6), _trainable(root / "kill9_ref", 6))
    names = sorted(p.name for p in (root / "kill9/checkpoints").iterdir())
    assert names == ["step_00000002", "step_00000004", "step_00000006"]  # the leftover temp dir is gone


@pytest.mark.parametrize("name", NAN_ENGINES)
def test_nan_on_one_rank_is_skipped_on_every_rank(runs, name):
    root, _ = runs
    run = root / name
    assert _result(root, f"{name}/result.json")["step"] == 5
    assert series(run, "nonfinite_skipped") == {1: 0, 2: 0, 3: 1, 4: 1, 5: 1}
    loss = series(run)
    assert loss[3] is None and all(loss[s] is not None for s in (1, 2, 4, 5))
    assert _same(_trainable(run, 2), _trainable(run, 3))  # step 3 changed nothing
    assert not _same(_trainable(run, 3), _trainable(run, 4))  # step 4 trained
    lr = series(run, "lr")
    assert lr[4] == lr[3] != lr[2]  # the LR schedule did not advance on the skipped step


def test_a_run_of_nans_stops_every_rank_with_the_named_error(runs):
    root, _ = runs
    for rank in (0, 1):
        err = _result(root, f"nanrun/result_rank{rank}.json")["error"]
        assert err.startswith("step 4: 3 consecutive steps (steps 2-4) had a non-finite loss"), err
    assert series(root / "nanrun", "nonfinite_skipped") == {1: 0, 2: 1, 3: 2}


def test_unshared_output_dir_fails_clearly_on_every_rank(runs):
    root, _ = runs
    for rank in (0, 1):
        err = _result(root, f"sharedfs/result_rank{rank}.json")["error"]
        assert "is not shared by all ranks" in err and "rank 1 on" in err and "no such file" in err, err
        err = _result(root, f"sharedfs/visible_rank{rank}.json")["error"]
        assert "rank 0 still does not see 1 file(s)" in err and "payload_1.bin (rank 1" in err, err
    assert not (root / "sharedfs/rank1/checkpoints").exists()


def test_time_based_save_is_agreed_across_ranks(runs):
    root, _ = runs
    assert _result(root, "timed/result.json")["step"] == 3
    assert [s for s, _ in list_checkpoints(root / "timed")] == [2]  # only rank 1's clock ran out
