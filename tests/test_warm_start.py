"""``--resume weights:CKPT`` in one process (engine none): what it loads, and what it refuses."""
import pytest
import torch
from safetensors.torch import load_file

from train_common import job_dict, series, synthetic_builders

from lrqat_dist.train import train
from lrqat_dist.train.config import config_from_dict


def _cfg(out, train_updates=None, **quant):
    d = job_dict(out, train={"max_steps": 2, "val_every": 0, **(train_updates or {})})
    d["quant"].update(quant)
    return config_from_dict(d)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    out = tmp_path_factory.mktemp("src")
    train(_cfg(out), resume="none", builders=synthetic_builders())
    return out


def test_weights_only_loads_the_trained_tensors_at_step_0(source, tmp_path):
    # With both learning rates 0 the new run's tensors stay what it loaded: the source's, bit for bit.
    res = train(_cfg(tmp_path / "frozen", {"lr": 0.0, "scale_lr": 0.0}), resume=f"weights:{source}",
                builders=synthetic_builders())
    assert res.step == 2 and not res.preempted
    a = load_file(source / "checkpoints/step_00000002/trainable.safetensors")
    b = load_file(tmp_path / "frozen/checkpoints/step_00000002/trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A new run: metrics from step 1 with the fresh schedule's warm-up learning rate; it trains on.
    train(_cfg(tmp_path / "new"), resume=f"weights:{source}", builders=synthetic_builders())
    lrs, new_lrs = series(source, "lr"), series(tmp_path / "new", "lr")
    assert sorted(new_lrs) == [1, 2] and new_lrs == lrs
    c = load_file(tmp_path / "new/checkpoints/step_00000002/trainable.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_weights_only_refuses_other_shapes_and_missing_paths_and_a_requeue_resumes(source, tmp_path, caplog):
    with pytest.raises(ValueError, match=r"lora_A has shape \(8, 64\) there, \(4, 64\)"):
        train(_cfg(tmp_path / "r4", rank=4), resume=f"weights:{source}", builders=synthetic_builders())
    with pytest.raises(FileNotFoundError, match="--resume weights:"):
        train(_cfg(tmp_path / "x"), resume=f"weights:{tmp_path / 'nowhere'}", builders=synthetic_builders())
    # The same command again (a preempted job requeued) into an output_dir that holds this run's
    # checkpoints: it resumes the newest (here the finished step 2) instead of starting over.
    with caplog.at_level("WARNING"):
        res = train(_cfg(source), resume=f"weights:{source}", builders=synthetic_builders())
    assert res.step == 2 and "resuming the newest instead of starting again" in caplog.text
