"""Shared pieces of the training tests: a tiny job config and a synthetic "global batch" data stream.

The synthetic loader makes data sharding exact: step ``t``'s global batch is a fixed set of rows, and
rank ``r``'s micro-batch ``m`` is row block ``r * grad_accum + m`` of it. So W ranks x k micro-batches
see exactly the sequences that 1 process x W*k micro-batches sees, and any loss difference between
engines is numerics, not data. (The real loader deals whole documents to ranks, which is the right
thing for training but makes the per-step batches differ with the world size.)
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch

VOCAB = 1024

TINY_JOB = {
    "model": {
        "config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB,
                   "max_position_embeddings": 128, "tie_word_embeddings": True},
        "init_seed": 0,
        "tokenizer": "unused-by-synthetic-data",
    },
    "quant": {"method": "lrqat", "bits": 4, "rank": 8, "downcast": "fixed", "range_init": "minmax"},
    "data": {"seq_len": 64},
    "train": {"output_dir": "UNSET", "max_steps": 8, "micro_batch_size": 2, "grad_accum": 1,
              # lr well above the paper's so the loss visibly moves in a few steps
              "lr": 1e-2, "scale_lr": 1e-4, "warmup_ratio": 0.25, "save_every": 0, "keep_last": 2,
              "log_every": 1, "val_every": 4, "dtype": "float32", "device": "cpu"},
    "dist": {"engine": "none"},
    "log": {"tensorboard": False, "progress_bar": False},
}


def job_dict(output_dir: str | Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """TINY_JOB with ``output_dir`` and per-section key updates, e.g. ``train={"grad_accum": 2}``."""
    d = copy.deepcopy(TINY_JOB)
    d["train"]["output_dir"] = str(output_dir)
    for name, updates in sections.items():
        d[name].update(updates)
    return d


def token_stream(n: int = 1 << 15, seed: int = 1234) -> torch.Tensor:
    """A learnable token sequence: a noisy affine recurrence over the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 4, (n,), generator=g)
    out = torch.empty(n, dtype=torch.long)
    x = 1
    for i in range(n):
        x = (x * 5 + 3 + int(noise[i])) % VOCAB
        out[i] = x
    return out


class GlobalBatchLoader:
    """Infinite, resumable; see the module docstring for which rows each (rank, micro-batch) gets."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, mbs: int, rank: int, world: int, grad_accum: int):
        self.tokens, self.seq_len, self.mbs = tokens, seq_len, mbs
        self.rank, self.world, self.accum = rank, world, grad_accum
        self.consumed = 0

    def _row(self, row: int) -> torch.Tensor:
        n = self.tokens.numel() - self.seq_len
        start = (row * 37 * self.seq_len) % n  # rows spread over the stream
        return self.tokens[start:start + self.seq_len]

    def __iter__(self):
        while True:
            step, micro = divmod(self.consumed, self.accum)
            first = step * self.world * self.accum * self.mbs + (self.rank * self.accum + micro) * self.mbs
            self.consumed += 1
            yield {"input_ids": torch.stack([self._row(first + i) for i in range(self.mbs)])}

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "grad_accum": self.accum}

    def load_state_dict(self, sd: dict) -> None:
        self.consumed = sd["consumed"]

    def load_resharded_state(self, states: list[dict]) -> None:
        """Elastic resume: every old rank consumed ``step * grad_accum`` micro-batches; continue at the
        same step (the global batch of a step is the same rows on every world size)."""
        steps = {s["consumed"] // s["grad_accum"] for s in states}
        assert len(steps) == 1 and all(s["consumed"] % s["grad_accum"] == 0 for s in states), states
        self.consumed = steps.pop() * self.accum

    def skip_counts(self) -> dict:
        return {}


VAL_ROWS = 8


def val_batches(tokens: torch.Tensor, seq_len: int, mbs: int, rank: int, world: int) -> list[dict]:
    """``VAL_ROWS`` fixed rows from the end of the stream, dealt round-robin to ranks."""
    rows = [tokens[-(i + 1) * seq_len:][:seq_len] for i in range(VAL_ROWS)][rank::world]
    return [{"input_ids": torch.stack(rows[i:i + mbs])} for i in range(0, len(rows), mbs)]


def synthetic_builders():
    """``Builders`` with the synthetic train and validation data and no tokenizer."""
    from lrqat_dist.train import Builders

    tokens = token_stream()

    def train_loader(cfg, tokenizer, env):
        return GlobalBatchLoader(tokens, cfg.data.seq_len, cfg.train.micro_batch_size, env.rank,
                                 env.world_size, cfg.train.grad_accum)

    def val_loader(cfg, tokenizer, env):
        if not cfg.train.val_every:
            return None
        return val_batches(tokens, cfg.data.seq_len, cfg.train.micro_batch_size, env.rank, env.world_size)

    return dataclasses.replace(Builders(), tokenizer=lambda cfg, cache: None, train_loader=train_loader,
                               val_loader=val_loader)


def series(output_dir: str | Path, key: str = "loss") -> dict[int, float]:
    """``{step: value}`` of one metric from ``<output_dir>/metrics.jsonl``."""
    from lrqat_dist.train import read_metrics

    return {r["step"]: r[key] for r in read_metrics(output_dir) if key in r}
