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

import logging
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)
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


@torch.no_grad()
def check_gguf_runtimes(path: str | Path, model, tokenizer, probe_ids: torch.Tensor) -> tuple[list[str], dict]:
    """Load ``path`` the way its consumers do and compare with the exported ``model`` (after
    :func:`lrqat_dist.export.export_gguf`, i.e. with fp16 scales): transformers' GGUF loader must give
    every quantized weight as ``fold().dequantize()`` (bit for bit for Q4_0/Q5_0/Q8_0, within the
    reported fp16 rounding of ``m`` for Q4_1/Q5_1) and the original tokenizer's ids; llama.cpp (if
    installed) is compared on ``probe_ids`` ([1, T]) with that dequantized model. Returns (checks, stats)."""
    from ..model import quantized_layers
    from .verify import ExportVerificationError

    checks, stats = [], {}
    logger.info("[export] loading %s with transformers' GGUF reader", path)
    deq, gguf_tok = load_gguf_dequantized(path)
    worst, n_exact, failures = 0.0, 0, []
    for name, layer in quantized_layers(model).items():
        fw = layer.fold()
        want, got = fw.dequantize(), deq.get_submodule(name).weight.detach().float()
        if torch.equal(got, want):
            n_exact += 1
            continue
        err = (got - want).abs().max().item()
        worst = max(worst, err)
        if fw.symmetric or err > fw.scale.abs().max().item() * 2 ** -6:
            failures.append(f"{name}: max abs diff {err:.3e}")
    if failures:
        raise ExportVerificationError("transformers' GGUF reader: weights differ from the fold:\n  - "
                                      + "\n  - ".join(failures[:10]))
    sample = "The quick brown fox jumps over the lazy dog. 12345 + 678 = 13023; naïve café, 東京."
    want_ids = tokenizer(sample, add_special_tokens=False).input_ids
    same_ids = gguf_tok(sample, add_special_tokens=False).input_ids == want_ids
    if not same_ids:
        raise ExportVerificationError("transformers' GGUF reader: the file's tokenizer encodes a sample differently "
                                      "from the model's tokenizer")
    stats["transformers_gguf_max_abs_weight_diff"] = worst
    checks.append(f"transformers' GGUF loader: {n_exact} quantized weights equal fold().dequantize() bit for bit"
                  + (f", the others within {worst:.3e} (fp16 rounding of m)" if worst else "")
                  + "; the file's tokenizer encodes a sample like the model's")
    missing = llama_cpp_missing()
    if missing:
        stats["llama_cpp"] = f"skipped: {missing}"
        return checks, stats
    ids = probe_ids[0]
    ref = deq(input_ids=ids[None]).logits[0].float()
    with LlamaCpp(path, n_ctx=max(64, len(ids))) as lc:
        got = lc.logits(ids)
        tok_same = lc.tokenize(sample) == tokenizer(sample, add_special_tokens=False).input_ids
    nll = lambda lg: torch.nn.functional.cross_entropy(lg[:-1].double(), ids[1:]).item()  # noqa: E731
    diff = (got - ref).abs()
    stats.update({"llama_cpp_max_abs_logit_diff": diff.max().item(),
                  "llama_cpp_mean_abs_logit_diff": diff.mean().item(),
                  "llama_cpp_nll": nll(got), "dequantized_nll": nll(ref), "probe_tokens": len(ids),
                  "llama_cpp_tokenizer_same": tok_same})
    checks.append(f"llama.cpp loads it: logits vs the dequantized export on {len(ids)} probe tokens max |diff| "
                  f"{diff.max().item():.3f} (mean {diff.mean().item():.4f}); NLL {nll(got):.4f} vs {nll(ref):.4f}; "
                  f"llama.cpp's tokenizer {'matches' if tok_same else 'DIFFERS from'} the model's on a sample")
    return checks, stats
