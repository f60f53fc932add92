"""WikiText-2-style perplexity: the whole text tokenized once, cut into non-overlapping blocks.

This is the protocol of the LR-QAT / GPTQ papers: join the documents, tokenize once, take
``n = len(ids) // seq_len`` blocks of ``seq_len`` tokens (the tail is dropped), and average the
next-token NLL over every predicted position (``seq_len - 1`` per block; the first token of a block
has no context). ``ppl = exp(sum NLL / predicted tokens)``, accumulated in float64.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean NLL per predicted token (nats)
    predicted_tokens: int
    blocks: int
    seq_len: int
    text_tokens: int  # tokens in the tokenized text, including the dropped tail
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def read_text_files(paths: list[str | Path], joiner: str = "\n\n") -> str:
    """The files' contents (UTF-8) joined by ``joiner`` (WikiText-2 raw files are used as they are)."""
    if not paths:
        raise ValueError("perplexity: no text files given")
    texts = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"perplexity: text file {p} does not exist")
        texts.append(p.read_text(encoding="utf-8"))
    return joiner.join(texts)


def tokenize_text(tokenizer, text: str, add_special_tokens: bool = True) -> torch.Tensor:
    """1-D int64 token ids of the whole text (one BOS at the start when the tokenizer adds one)."""
    ids = tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity_from_ids(model: nn.Module, ids: torch.Tensor, seq_len: int = 2048, batch_size: int = 1,
                        max_blocks: int | None = None) -> PerplexityResult:
    """Perplexity of ``model`` on the non-overlapping ``seq_len`` blocks of the 1-D token tensor ``ids``
    (progress: about ten INFO records of this module's logger)."""
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise ValueError(f"perplexity: seq_len={seq_len} exceeds the model's max_position_embeddings={max_pos}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        return perplexity_of(lambda batch: model(input_ids=batch.to(device), use_cache=False).logits, ids, seq_len,
                             batch_size, max_blocks)
    finally:
        model.train(was_training)


@torch.no_grad()
def perplexity_of(logits_fn: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, seq_len: int = 2048,
                  batch_size: int = 1, max_blocks: int | None = None) -> PerplexityResult:
    """The protocol of the module docstring for any ``logits_fn``: ``[b, seq_len]`` ids -> ``[b, seq_len, vocab]``
    logits (a torch model, or another runtime such as llama.cpp)."""
    if seq_len < 2:
        raise ValueError(f"perplexity: seq_len must be >= 2, got {seq_len}")
    if batch_size < 1:
        raise ValueError(f"perplexity: batch_size must be >= 1, got {batch_size}")
    n_blocks = ids.numel() // seq_len
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    if n_blocks == 0:
        raise ValueError(f"perplexity: the text has {ids.numel()} tokens, fewer than one block of seq_len={seq_len}")
    t0 = time.time()
    blocks = ids[: n_blocks * seq_len].view(n_blocks, seq_len)
    total_nll, predicted = 0.0, 0
    n_batches = -(-n_blocks // batch_size)
    for start in range(0, n_blocks, batch_size):
        batch = blocks[start:start + batch_size]
        logits = logits_fn(batch)
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                              batch[:, 1:].reshape(-1).to(logits.device), reduction="sum")
        total_nll += float(nll.double())
        predicted += batch[:, 1:].numel()
        done = min(start + batch_size, n_blocks)
        if (start // batch_size + 1) % max(1, n_batches // 10) == 0 or done == n_blocks:
            logger.info("[ppl] %d/%d blocks, running ppl %.4f", done, n_blocks, math.exp(total_nll / predicted))
    nll = total_nll / predicted
    return PerplexityResult(ppl=math.exp(nll), nll=nll, predicted_tokens=predicted, blocks=n_blocks,
                            seq_len=seq_len, text_tokens=ids.numel(), seconds=time.time() - t0)


def text_perplexity(model: nn.Module, tokenizer, text: str, seq_len: int = 2048, batch_size: int = 1,
                    max_blocks: int | None = None, add_special_tokens: bool = True) -> PerplexityResult:
    """Tokenize ``text`` once with ``tokenizer`` and run :func:`perplexity_from_ids`."""
    return perplexity_from_ids(model, tokenize_text(tokenizer, text, add_special_tokens), seq_len, batch_size,
                               max_blocks)
