"""Run under ``torchrun --nproc_per_node 2``: DL-QAT and LoQT under DeepSpeed ZeRO-2/3 and FSDP2.

    torchrun --nproc_per_node 2 tests/dist/method_matrix.py OUT_JSON [--engines ds2,ds3,fsdp2]

After every optimizer step (every rank, collectively):
- LoQT: the fingerprints of all buffers (merged codes, scales, P) and of the full B tensors must be
  identical on every rank; under ZeRO the fp32 master of B must equal the working B (a merge resets
  both); the merge counter is recorded. ``tau = 1`` and error compensation: updates after steps 1, 3
  and the final merge after 5, with non-zero B written through the engine at step 3.
- DL-QAT (phase 1 = steps 1-2): which parameter kinds moved in each step.
- LR-QAT with activation quantization (``a8kv4``): per-step losses and how many activation quantizers
  the engine-wrapped model holds (the test compares the losses with a single-process run).
One launch for everything: each torchrun launch costs 11-17 s of start-up here. Rank 0 writes OUT_JSON.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from train_common import job_dict, synthetic_builders

ENGINES = {"ds2": {"engine": "deepspeed", "zero_stage": 2}, "ds3": {"engine": "deepspeed", "zero_stage": 3},
           "fsdp2": {"engine": "fsdp2"}}
TRAIN = {"val_every": 0, "save_every": 0, "save_final": False, "warmup_ratio": 0.0, "micro_batch_size": 1,
         "grad_accum": 2}
METHODS = {
    "loqt": ({"method": "loqt", "rank": 4, "range_init": "minmax", "loqt_tau": 1, "loqt_scale": 0.5,
              "loqt_error_comp": 1}, 5),
    # DL-QAT: the lp range clips at step 1, so b has a gradient (with min-max nothing clips and its exact
    # gradient is 0: docs/dlqat.md)
    "dlqat": ({"method": "dlqat", "rank": 4, "alpha": 4.0, "range_init": "lp", "dlqat_phase1_steps": 2}, 4),
    "actq": ({"method": "lrqat", "rank": 4, "activations": "a8kv4"}, 3),
}
KINDS = ("scale", "offset", "magnitude", "lora_A", "lora_B")


def _fingerprint(tensors: list[torch.Tensor]) -> torch.Tensor:
    rows = []
    for t in tensors:
        v = t.detach().reshape(-1).double().cpu()
        w = torch.arange(1, v.numel() + 1, dtype=torch.float64).remainder_(1021)
        rows.append(torch.stack([v.sum(), (v * w).sum()]))
    return torch.stack(rows)


def run_loqt(trainer, env) -> dict:
    from lrqat_dist.methods.loqt import LoQTLinear
    from lrqat_dist.train.build import buffer_fingerprint

    model, engine = trainer.engine.module, trainer.engine
    names = [f"{n}.lora_B" for n, m in model.named_modules() if isinstance(m, LoQTLinear)]
    out = {"same_buffers": [], "same_B": [], "master_ok": [], "merges": [], "B_nonzero": []}

    def check(step):
        fps = env.all_gather(buffer_fingerprint(model))
        full = engine.full_params(names)
        bfps = env.all_gather(_fingerprint([full[n] for n in names]))
        master_ok = True
        if engine.name == "deepspeed" and engine.zero_stage > 0:
            from deepspeed.utils import safe_get_full_fp32_param

            params = dict(model.named_parameters())
            master_ok = all(torch.equal(safe_get_full_fp32_param(params[n]).cpu(), full[n].cpu()) for n in names)
        out["same_buffers"].append(all(torch.equal(f, fps[0]) for f in fps))
        out["same_B"].append(all(torch.equal(f, bfps[0]) for f in bfps))
        out["master_ok"].append(bool(env.all_reduce([float(master_ok)], "min")[0]))
        out["merges"].append(trainer.hooks.merges)
        out["B_nonzero"].append(any(bool(full[n].any()) for n in names))

    trainer.run("none", on_step=check)
    return out


def run_dlqat(trainer, env) -> dict:
    snaps = [trainer.engine.trainable_state()]
    trainer.run("none", on_step=lambda step: snaps.append(trainer.engine.trainable_state()))
    if not env.is_main:
        return {}
    moved = []
    for a, b in zip(snaps, snaps[1:]):
        moved.append({k: any(not torch.equal(a[n], b[n]) for n in a if n.endswith("." + k)) for k in KINDS})
    return {"moved": moved}


def run_actq(trainer, env) -> dict:
    from lrqat_dist.quant.activation import DynamicActQuantizer
    from lrqat_dist.train.metrics import read_metrics

    n_quantizers = sum(isinstance(m, DynamicActQuantizer) for m in trainer.engine.module.modules())
    trainer.run("none")
    return {"losses": [r["loss"] for r in read_metrics(trainer.output_dir) if "loss" in r],
            "quantizers": n_quantizers} if env.is_main else {}


RUNNERS = {"loqt": run_loqt, "dlqat": run_dlqat, "actq": run_actq}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out_json")
    p.add_argument("--engines", default="ds2,ds3,fsdp2")
    args = p.parse_args()
    from lrqat_dist.train.config import config_from_dict
    from lrqat_dist.train.loop import Trainer

    root = Path(args.out_json).parent
    results = {}
    for engine in args.engines.split(","):
        for method, (quant, steps) in METHODS.items():
            cfg = config_from_dict(job_dict(root / f"{engine}-{method}", quant=quant, dist=ENGINES[engine],
                                            train={**TRAIN, "max_steps": steps}))
            trainer = Trainer(cfg, synthetic_builders())
            results[f"{engine}/{method}"] = RUNNERS[method](trainer, trainer.env)
    if int(os.environ["RANK"]) == 0:
        Path(args.out_json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
