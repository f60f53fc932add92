"""torchrun worker of tests/test_consolidate.py: trains the same tiny job with each 2-process engine.

    torchrun --nproc_per_node 2 tests/dist/consolidate_worker.py OUT
"""
import sys
from pathlib import Path

from train_common import job_dict, synthetic_builders  # this script's folder is on sys.path

REPO = Path(__file__).resolve().parents[2]
ENGINES = {"ds2": {"engine": "deepspeed", "zero_stage": 2}, "ds3": {"engine": "deepspeed", "zero_stage": 3},
           "fsdp2": {"engine": "fsdp2"}}
STEPS = 2
QUANT = {"bits": 3, "group_size": 32, "symmetric": False}
TOKENIZER = REPO / "tests" / "fixtures" / "lm_eval_task" / "byte_tokenizer"  # copied into exports


def job(out: Path, engine: str) -> dict:
    return job_dict(out, dist=ENGINES[engine], quant=QUANT, model={"tokenizer": str(TOKENIZER)},
                    train={"max_steps": STEPS, "val_every": 0})


def worker(root: Path) -> None:
    from lrqat_dist.train import train
    from lrqat_dist.train.config import config_from_dict

    for name in ENGINES:
        train(config_from_dict(job(root / name, name)), resume="none", builders=synthetic_builders())


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
    sys.exit(0)
