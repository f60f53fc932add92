"""Running a GGUF export the way its consumers do: transformers' GGUF reader and llama.cpp.

- :func:`load_gguf_dequantized`: transformers (``from_pretrained(dir, gguf_file=...)``) dequantizes
  the blocks with gguf-py, undoes llama.cpp's q/k row permutation and builds the tokenizer from the
  file's metadata: an independent reader of our names, permutation, metadata and tokenizer. This is
  "the dequantized export" that llama.cpp's numbers are compared with.
- :class:`LlamaCpp`: logits from llama.cpp through ``llama-cpp-python`` (optional: ``pip install
  llama-cpp-python`` compiles llama.cpp, about 13 minutes on 2 cores). llama.cpp's CPU matmuls
  quantize the activations to 8 bits for Q4_0/Q8_0 dot products, so its logits differ from the
  dequantized model's by more than float noise; perplexities agree to well under 1%.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

LLAMA_CPP_INSTALL = ("pip install llama-cpp-python  (builds llama.cpp from source with cmake and a C++ compiler; "
                     "about 13 minutes on 2 cores; see docs/export.md)")


def llama_cpp_missing() -> str | None:
    """None when ``llama_cpp`` imports, else the reason (with the install command)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return f"llama-cpp-python is not installed ({e}); {LLAMA_CPP_INSTALL}"
    return None


def load_gguf_dequantized(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a GGUF file with transformers' GGUF loader (weights dequantized)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                 local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    model.hf_quantizer = None
    return model.eval(), tok


class LlamaCpp:
    """A GGUF file loaded in llama.cpp; :meth:`logits` of one token sequence (full context, no cache reuse)."""

    def __init__(self, path: str | Path, n_ctx: int = 2048, n_threads: int | None = None):
        missing = llama_cpp_missing()
        if missing:
            raise ImportError(missing)
        from llama_cpp import Llama

        self.n_ctx = n_ctx
        self.llm = Llama(str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=True,
                         n_threads=n_threads or torch.get_num_threads(), verbose=False)

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)

    def logits(self, ids: torch.Tensor | list[int]) -> torch.Tensor:
        """``[T, vocab]`` fp32 logits of the 1-D sequence ``ids`` (T <= n_ctx)."""
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        if len(ids) > self.n_ctx:
            raise ValueError(f"llama.cpp: {len(ids)} tokens exceed n_ctx={self.n_ctx}")
        self.llm.reset()
        self.llm.eval(ids)
        return torch.from_numpy(np.array(self.llm.scores[: len(ids)], dtype=np.float32))

    def batch_logits(self, batch: torch.Tensor) -> torch.Tensor:
        """``[b, T]`` -> ``[b, T, vocab]`` (rows one after the other): the ``logits_fn`` of
        :func:`lrqat_dist.eval.perplexity.perplexity_of`."""
        return torch.stack([self.logits(row) for row in batch])

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
