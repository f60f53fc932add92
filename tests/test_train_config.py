"""Training config: typed sections with named errors, --set overrides, schedule, parameter groups."""
import sys
from pathlib import Path

import pytest
import torch

from train_common import job_dict

from lrqat_dist.train.config import apply_override, config_from_dict, load_config, parse_yaml

REPO = Path(__file__).resolve().parents[1]


def test_shipped_configs_load():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.train.output_dir and cfg.quant.bits >= 2, path


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(REPO / "configs/tiny-cpu.yaml",
                      ["train.max_steps=7", "train.lr=2e-3", "dist.engine=fsdp2", "model.config.num_hidden_layers=3",
                       "train.betas=[0.8, 0.9]", "quant.group_size=32", "train.grad_clip=null"])
    assert cfg.train.max_steps == 7 and cfg.train.lr == 2e-3 and cfg.dist.engine == "fsdp2"
    assert cfg.model.config["num_hidden_layers"] == 3 and cfg.train.betas == [0.8, 0.9]
    assert cfg.quant.group_size == 32 and cfg.train.grad_clip is None


def test_yaml_reads_exponent_floats():
    # Plain YAML 1.1 reads 1e-3 as a string; the training lr is usually written that way.
    assert parse_yaml("lr: 1e-3\nn: 10\ns: 1e3x") == {"lr": 1e-3, "n": 10, "s": "1e3x"}


@pytest.mark.parametrize("section,update,message", [
    ("train", {"max_step": 10}, "train.max_step: unknown key"),
    ("train", {"max_steps": "ten"}, "train.max_steps: expected int"),
    ("train", {"lr": "fast"}, "train.lr: expected float"),
    ("train", {"schedule": "step"}, "train.schedule: unknown 'step'"),
    ("train", {"betas": [0.9]}, "train.betas: expected two values"),
    ("train", {"grad_accum": 0}, "train.grad_accum: must be >= 1"),
    ("train", {"output_dir": None}, "train.output_dir: required"),
    ("dist", {"engine": "ddp"}, "dist.engine: unknown 'ddp'"),
    ("dist", {"zero_stage": 4}, "dist.zero_stage: expected 0, 1, 2 or 3"),
    ("dist", {"offload_optimzer": True}, "dist.offload_optimzer: unknown key"),
    ("quant", {"bits": 9}, "quant.bits"),
    ("quant", {"methd": "lrqat"}, "quant.methd: unknown key"),
    ("data", {"seq_len": "long"}, "data.seq_len: expected int"),
    ("log", {"wandb": True}, "log.wandb: unknown key"),
    ("model", {"path": "/some/dir"}, "model: give exactly one of model.path"),
])
def test_named_errors(section, update, message):
    d = job_dict("/tmp/x")
    d[section].update(update)
    with pytest.raises(ValueError) as e:
        config_from_dict(d)
    assert message in str(e.value)


def test_structure_errors(tmp_path):
    d = job_dict("/tmp/x")
    d["trian"] = {}
    with pytest.raises(ValueError, match="trian: unknown section"):
        config_from_dict(d)
    with pytest.raises(ValueError, match="--set foo.bar: unknown section 'foo'"):
        apply_override({}, "foo.bar=1")
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        apply_override({}, "train.max_steps")
    with pytest.raises(ValueError, match="--set train.lr.x: train.lr is not a mapping"):
        apply_override({"train": {"lr": 1.0}}, "train.lr.x=2")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def _launcher():
    import launch.train  # the repository root is on sys.path: pyproject's pythonpath

    return launch.train


def test_cli_reports_config_errors(capsys):
    main = _launcher().main
    assert main(["--config", str(REPO / "configs/tiny-cpu.yaml"), "--set", "train.warmup_ratio=2"]) == 2
    assert "config error: train.warmup_ratio: must be in [0, 1)" in capsys.readouterr().err
    assert main(["--config", str(REPO / "configs/tiny-cpu.yaml"), "--set", "train.max_steps=3", "--print-config"]) == 0
    assert "max_steps: 3" in capsys.readouterr().out


def test_deepspeed_config_file_is_completed_and_checked(tmp_path):
    from lrqat_dist.engines.deepspeed import build_ds_config

    cfg = config_from_dict(job_dict(tmp_path, train={"micro_batch_size": 2, "grad_accum": 3},
                                    dist={"engine": "deepspeed", "zero_stage": 3, "offload_optimizer": True}))
    ds = build_ds_config(cfg.train, cfg.dist, world_size=4, device=torch.device("cpu"))
    assert ds["train_batch_size"] == 24 and ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    assert ds["gradient_clipping"] == 1.0 and "bf16" not in ds and "optimizer" not in ds

    f = tmp_path / "ds.json"
    f.write_text('{"zero_optimization": {"stage": 3, "overlap_comm": true}, "train_batch_size": "auto"}')
    cfg.dist.ds_config = str(f)
    ds = build_ds_config(cfg.train, cfg.dist, world_size=4, device=torch.device("cpu"))
    assert ds["zero_optimization"]["overlap_comm"] is True and ds["train_batch_size"] == 24
    for text, message in [('{"train_batch_size": 8}', "train_batch_size=8 disagrees"),
                          ('{"zero_optimization": {"stage": 1}}', "zero_optimization.stage=1 disagrees"),
                          ('{"bf16": {"enabled": true}}', "bf16.enabled"),
                          ('{"optimizer": {"type": "Adam"}}', "remove its 'optimizer' section")]:
        f.write_text(text)
        with pytest.raises(ValueError, match=message):
            build_ds_config(cfg.train, cfg.dist, world_size=4, device=torch.device("cpu"))


def test_schedule_shapes(tmp_path):
    from lrqat_dist.engines.optim import lr_factor

    base = job_dict(tmp_path, train={"max_steps": 100, "warmup_ratio": 0.1})
    linear = lr_factor(config_from_dict(base).train)
    assert linear(0) == pytest.approx(1 / 11) and linear(9) == pytest.approx(10 / 11) and linear(10) == 1.0
    assert linear(55) == pytest.approx(0.5) and linear(100) == 0.0
    base["train"].update(schedule="cosine", min_lr_ratio=0.1)
    cosine = lr_factor(config_from_dict(base).train)
    assert cosine(10) == 1.0 and cosine(55) == pytest.approx(0.55) and cosine(100) == pytest.approx(0.1)
    base["train"].update(schedule="constant", warmup_ratio=0.0)
    assert lr_factor(config_from_dict(base).train)(0) == 1.0


def test_param_groups_split_scales(tmp_path):
    from lrqat_dist.engines.optim import build_optimizer
    from lrqat_dist.train import build_model

    cfg = config_from_dict(job_dict(tmp_path))
    model = build_model(cfg)
    groups = {g["name"]: g for g in build_optimizer(model, cfg.train).param_groups}
    assert groups["adapters"]["lr"] == cfg.train.lr and groups["scales"]["lr"] == cfg.train.scale_lr
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith(".scale") for p in groups["scales"]["params"])
    assert all(names[id(p)].endswith((".lora_A", ".lora_B")) for p in groups["adapters"]["params"])
    assert len(groups["scales"]["params"]) == 14 and len(groups["adapters"]["params"]) == 28
    # Rebuilding gives the same model (buffers and adapter init), as every rank and export rely on.
    again = build_model(cfg)
    for (n, a), (_, b) in zip(list(model.state_dict().items()), list(again.state_dict().items())):
        assert torch.equal(a, b), n


def test_deepspeed_engine_uses_the_shared_optimizer_builder(tmp_path):
    """DeepSpeed's torch optimizer (and, with another class, FusedAdam / DeepSpeedCPUAdam) comes from
    the one builder: same groups, hyper-parameters and kernels as the other engines'."""
    from lrqat_dist.engines import EngineConfig
    from lrqat_dist.engines.deepspeed import DeepSpeedEngine
    from lrqat_dist.engines.optim import build_optimizer
    from lrqat_dist.train import build_model

    cfg = config_from_dict(job_dict(tmp_path, train={"lr": 3e-3, "scale_lr": 2e-5, "weight_decay": 0.1,
                                                     "betas": [0.8, 0.9], "eps": 1e-6},
                                    dist={"engine": "deepspeed", "ds_optimizer": "torch"}))
    model = build_model(cfg)
    ds = DeepSpeedEngine._optimizer(model, EngineConfig(cfg.train, cfg.dist, lr_windows={}))
    ref = build_optimizer(model, cfg.train)
    assert type(ds) is torch.optim.AdamW and ds.defaults == ref.defaults and ds.defaults["foreach"] is False
    assert [{k: v for k, v in g.items() if k != "params"} for g in ds.param_groups] == \
        [{k: v for k, v in g.items() if k != "params"} for g in ref.param_groups]
    assert [[id(p) for p in g["params"]] for g in ds.param_groups] == [[id(p) for p in g["params"]]
                                                                       for g in ref.param_groups]
    assert ds.defaults["betas"] == (0.8, 0.9) and ds.defaults["eps"] == 1e-6

    seen = {}

    class AdamLike(torch.optim.AdamW):  # stands in for DeepSpeed's compiled Adam classes
        def __init__(self, params, adamw_mode, **kwargs):
            seen.update(adamw_mode=adamw_mode, **kwargs)
            super().__init__(params, **kwargs)

    other = build_optimizer(model, cfg.train, AdamLike, adamw_mode=True)
    assert seen == {"adamw_mode": True, "lr": 3e-3, "betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.1}
    assert [g["lr"] for g in other.param_groups] == [3e-3, 2e-5]
