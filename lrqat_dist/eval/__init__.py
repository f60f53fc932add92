"""Evaluation: WikiText-2-style perplexity and offline lm-eval harness tasks, on runs, exports or HF dirs.

    from lrqat_dist.eval import load_for_eval, text_perplexity, run_lm_eval
    m = load_for_eval("exports/tiny-ct")
    print(text_perplexity(m.model, m.tokenizer, open("wiki.test.raw").read(), seq_len=2048).ppl)
"""
from .lm_eval_runner import PAPER_TASKS, expand_tasks, paper_average, run_lm_eval, summarize
from .perplexity import PerplexityResult, perplexity_from_ids, read_text_files, text_perplexity, tokenize_text
from .sources import KINDS, EvalModel, detect_kind, load_for_eval

__all__ = ["load_for_eval", "detect_kind", "EvalModel", "KINDS", "text_perplexity", "perplexity_from_ids",
           "tokenize_text", "read_text_files", "PerplexityResult", "run_lm_eval", "summarize", "paper_average",
           "expand_tasks", "PAPER_TASKS"]
