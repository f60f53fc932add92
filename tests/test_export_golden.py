"""Export bytes of a fixed tiny run are pinned: refactors must not change a single byte.

The run is built so that every number is exact on any CPU (no ISA-dependent matmul rounding):
random init from torch's CPU generator, min-max ranges (elementwise), adapters whose entries are
small dyadic rationals (so B @ A is exact in fp32 whatever the summation order), scales moved by an
elementwise product. The hashes below were recorded on the tree before the issue-12 reorganisation
(commit e3c59dc); a change to them is a change of behaviour, not of layout.
"""
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_config

FIXTURE = Path(__file__).parent / "fixtures" / "lm_eval_task"

SETTINGS = {
    "w4pc-sym-q4.4": {"bits": 4, "group_size": None, "symmetric": True, "downcast": "fixed"},
    "w3g32-asym-q4.4": {"bits": 3, "group_size": 32, "symmetric": False, "downcast": "fixed"},
}
# sha256 of every exported .safetensors file, per setting and format (recorded before the move).
GOLDEN: dict[str, dict[str, str]] = {
    "w3g32-asym-q4.4": {
        "native/model.safetensors": "46e42bea11dc211de788264998f009ad38f4b15c973320882951c4d22a5c9971",
        "native/quantized.safetensors": "892a412bfb8af442d1de925dee2677322a1fe110ba161e18cd422412b5081cd2",
        "compressed-tensors/model.safetensors": "cbc4d63bb410725efeaf8706518a3e6445ceb9a090fe8e9f0cf2d76072a057c5",
        "dequantized/model.safetensors": "1cd5c7b5fca1eee7c26cac2c50b66f99c920c48864a06e8558f4506f651389b1",
    },
    "w4pc-sym-q4.4": {
        "native/model.safetensors": "46e42bea11dc211de788264998f009ad38f4b15c973320882951c4d22a5c9971",
        "native/quantized.safetensors": "3b60c5e6d0198c22457930783f8648015dbb2eb4e3c2a40a82ad371132cc6d12",
        "compressed-tensors/model.safetensors": "5359291fbbbfa37f6696cd3ebf0934ad0a077bf370b5e8b1399d6e2bc3210afd",
        "dequantized/model.safetensors": "4530b60cdee192367546a50de2a673697b07109059f1cb1ddcf5a3cb70b72448",
    },
}


def _exact_run(root: Path, quant: dict) -> None:
    """A run directory with one complete checkpoint whose trainable tensors are exact dyadic values."""
    from lrqat_dist.train.build import build_model
    from lrqat_dist.checkpoint import CONFIG_FILE, META_FILE, TRAINABLE_FILE, checkpoint_path
    from lrqat_dist.train.config import dump_config, load_config

    cfg = load_config(base={
        "model": {"config": tiny_config(vocab_size=260), "tokenizer": str(FIXTURE / "byte_tokenizer"),
                  "init_seed": 11},
        "quant": {**quant, "rank": 4, "alpha": 1.0, "range_init": "minmax"},
        "train": {"output_dir": str(root)}})
    model = build_model(cfg, "cpu", torch.float32)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_A"):
                p.copy_(torch.randint(-3, 4, p.shape, generator=g).float() / 8)
            elif n.endswith("lora_B"):
                p.copy_(torch.randint(-4, 5, p.shape, generator=g).float() / 2)
            elif n.endswith(".scale"):
                p.mul_(1 + torch.randint(-8, 9, p.shape, generator=g).float() / 256)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ckpt = checkpoint_path(root, 5)
    ckpt.mkdir(parents=True)
    (root / CONFIG_FILE).write_text(dump_config(cfg))
    (ckpt / CONFIG_FILE).write_text(dump_config(cfg))
    save_file(trainable, str(ckpt / TRAINABLE_FILE))
    (ckpt / META_FILE).write_text(json.dumps({"format": 1, "step": 5, "engine": "none", "world_size": 1,
                                              "zero_stage": None, "trainable": list(trainable),
                                              "complete": True}))


def _export_hashes(tmp_path: Path, quant: dict) -> dict[str, str]:
    from lrqat_dist.export import export_model
    from lrqat_dist.export.run import load_run

    _exact_run(tmp_path / "run", quant)
    run = load_run(tmp_path / "run")
    out = {}
    for fmt in ("native", "compressed-tensors", "dequantized"):
        export_model(run.model, tmp_path / fmt, fmt, run.tokenizer, dtype="float32")
        for f in sorted((tmp_path / fmt).glob("*.safetensors")):
            out[f"{fmt}/{f.name}"] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_export_bytes_unchanged(tmp_path, setting):
    pytest.importorskip("compressed_tensors")
    got = _export_hashes(tmp_path, SETTINGS[setting])
    assert len(got) >= 3
    assert got == GOLDEN[setting]
