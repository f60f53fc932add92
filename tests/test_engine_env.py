"""Where a process runs (no GPU, no process group): local rank under each launcher, the ``auto``
compute dtype on GPUs with and without bf16, the fp16 refusal and the process-group timeout key."""
from datetime import timedelta

import pytest
import torch

from lrqat_dist.engines import env as engine_env
from lrqat_dist.engines.config import DistConfig, TrainConfig
from lrqat_dist.engines.env import local_rank, process_group_timeout, resolve_device, resolve_dtype


@pytest.mark.parametrize("environ, want", [
    ({}, 0),                                                              # plain python
    ({"LOCAL_RANK": "3"}, 3),                                             # torchrun, deepspeed launcher
    ({"OMPI_COMM_WORLD_LOCAL_RANK": "5", "OMPI_COMM_WORLD_RANK": "13"}, 5),  # mpirun / --launcher openmpi
    ({"MV2_COMM_WORLD_LOCAL_RANK": "2"}, 2),                              # MVAPICH2
    ({"MPI_LOCALRANKID": "6"}, 6),                                        # Intel MPI / MPICH hydra
    ({"SLURM_LOCALID": "7", "SLURM_PROCID": "15"}, 7),                    # srun
    # torchrun inside an srun allocation (one task per node): torchrun's LOCAL_RANK wins
    ({"LOCAL_RANK": "1", "SLURM_LOCALID": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "4"}, 1),
    ({"LOCAL_RANK": "", "OMPI_COMM_WORLD_LOCAL_RANK": "4"}, 4),           # empty = unset
])
def test_local_rank_from_each_launcher(environ, want):
    assert local_rank(environ) == want


def test_local_rank_reads_the_process_environment(monkeypatch):
    for key in engine_env.LOCAL_RANK_VARS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "3")
    assert local_rank() == 3
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "three")
    with pytest.raises(ValueError, match="OMPI_COMM_WORLD_LOCAL_RANK='three'"):
        local_rank()


def test_claim_device_under_mpirun_takes_the_local_gpu(monkeypatch):
    """Before the process group exists (DeepSpeed under mpirun claims the device first), rank 5 of a
    node must build on cuda:5, not cuda:0."""
    for key in engine_env.LOCAL_RANK_VARS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "5")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    claimed = []
    monkeypatch.setattr(torch.cuda, "set_device", claimed.append)
    device = engine_env.claim_device(TrainConfig(output_dir="x", device="cuda"))
    assert device == torch.device("cuda", 5) and claimed == [torch.device("cuda", 5)]
    assert resolve_device(TrainConfig(output_dir="x", device="cpu"), 5) == torch.device("cpu")


@pytest.mark.parametrize("bf16, want", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_follows_bf16_support(monkeypatch, bf16, want):
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    train = TrainConfig(output_dir="x", dtype="auto")
    assert resolve_dtype(train, torch.device("cuda", 0)) == want
    assert asked == [False]  # native bf16 only: pre-Ampere GPUs "support" it by emulation
    assert resolve_dtype(train, torch.device("cpu")) == torch.float32
    # an explicit choice is taken as it is
    assert resolve_dtype(TrainConfig(output_dir="x", dtype="bfloat16"), torch.device("cuda", 0)) == torch.bfloat16


def test_auto_dtype_warns_on_a_gpu_without_bf16(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with caplog.at_level("WARNING", logger="lrqat_dist.engines.env"):
        assert resolve_dtype(TrainConfig(output_dir="x"), torch.device("cuda", 1)) == torch.float32
    assert "cuda:1 has no bfloat16 support; computing in float32" in caplog.text


def test_float16_is_refused_with_the_reason():
    for spelling in ("float16",):
        with pytest.raises(ValueError, match="dtype: float16 is refused: .* loss scaling"):
            TrainConfig(output_dir="x", dtype=spelling)
    with pytest.raises(ValueError, match="dtype: unknown 'fp16'"):  # the config takes HF spellings only
        TrainConfig(output_dir="x", dtype="fp16")


def test_timeout_minutes():
    assert DistConfig().timeout_minutes == 30.0
    assert process_group_timeout(DistConfig(timeout_minutes=0.5)) == timedelta(seconds=30)
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="timeout_minutes: must be > 0"):
            DistConfig(timeout_minutes=bad)


def test_srun_tasks_without_rank_are_refused(monkeypatch):
    """srun without torchrun: several tasks, no RANK/WORLD_SIZE: every task would train alone as "rank
    0 of 1" into the same output_dir; refused by name. One task (or a launcher's RANK) is fine."""
    from lrqat_dist.engines.env import standalone_env

    for var in ("RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert standalone_env()["WORLD_SIZE"] == "1"
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert standalone_env()["WORLD_SIZE"] == "1"
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    with pytest.raises(RuntimeError, match="SLURM_STEP_NUM_TASKS=8.*torchrun"):
        standalone_env()
    monkeypatch.setenv("RANK", "3")  # torchrun inside the srun step describes the job
    assert standalone_env() == {}
