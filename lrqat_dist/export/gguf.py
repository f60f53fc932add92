"""Export to GGUF (llama.cpp, Ollama, LM Studio) with the trained integer grid kept exactly.

GGUF's legacy block types hold 32 weights of one row (along the input dimension) per block, with
one fp16 scale ``d`` (and, for the ``_1`` types, one fp16 offset ``m``):

======  ===============================  =============================================
type    value                            our grids that map onto it exactly
======  ===============================  =============================================
Q4_0    ``d * (c - 8)``, c in 0..15      symmetric <= 4 bit (c = q + 8); asymmetric <= 3 bit (c = u - z + 8)
Q5_0    ``d * (c - 16)``, c in 0..31     symmetric 5 bit; asymmetric 4 bit (``asym="exact"``)
Q8_0    ``d * c``, c int8                symmetric 6-8 bit; asymmetric 5-7 bit (c = u - z); asymmetric
                                         8 bit when every ``u - z`` fits int8 (checked)
Q4_1    ``d * c + m``, c in 0..15        asymmetric 4 bit (default): c = u, ``m = fp16(-d * z)``
Q5_1    ``d * c + m``, c in 0..31        asymmetric 5 bit (default): the same
======  ===============================  =============================================

A per-channel scale or a group of ``k * 32`` weights repeats its scale in each of its blocks, so
the grid is the trained one; only the fp16 storage of ``d`` (and of ``m``) rounds. The scales are
therefore rounded to fp16 in the model first (:func:`lrqat_dist.export.round_scales_`, reported,
with the logit drift against the fp32 model when probe ids are given) and the file is verified
against the fold of that model: bit for bit for Q4_0/Q5_0/Q8_0; for Q4_1/Q5_1 the fp16 rounding of
``m = -d*z`` is the only difference and its maximum is reported.

llama.cpp's converter permutes the rows of ``q_proj`` / ``k_proj`` (its rotary layout pairs
dimension ``i`` with ``i + head_dim/2`` as adjacent rows); whole rows move together, and with them
their scales and zero-points, so blocks (which run along the input dimension) stay exact.

Embeddings and an untied ``lm_head`` are written as F32, F16 (default) or Q8_0 (``embeddings``);
norms stay F32, as llama.cpp expects. The tokenizer (byte-level BPE: vocab, token types, merges,
special ids, chat template) goes into the file, so llama.cpp needs no other file.
"""
from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from ..methods import FoldedWeight
from ..model import quantized_layers
from ..quant.affine import QuantSpec
from .activations import check_carried, model_act_config
from .exactness import ExportRefused, _refuse, check_quantized_layers, round_scales_
from .verify import Checker, ExportReport, progress

logger = logging.getLogger(__name__)

FORMAT = "gguf"
BLOCK = 32
EMBEDDING_TYPES = ("f32", "f16", "q8_0")
ASYM_CHOICES = ("compact", "exact")
ALTERNATIVE = ("Alternatives: format 'compressed-tensors' (transformers, vLLM), 'native', or 'dequantized' "
               "(then llama.cpp's convert_hf_to_gguf.py + llama-quantize, which re-quantizes and loses the "
               "trained grid).")

# HF LLaMA module names -> GGUF tensor names (llama.cpp's LLM_ARCH_LLAMA tensor map).
_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def gguf_name(hf_module: str) -> str:
    """GGUF tensor name (without ``.weight``) of an HF LLaMA module, e.g. ``blk.3.attn_q``."""
    if hf_module in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_module]
    m = _LAYER_RE.match(hf_module)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise ExportRefused(f"{FORMAT}: no llama.cpp LLaMA tensor for module {hf_module!r}")


def _require_gguf():
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ImportError("format 'gguf' needs the gguf package: pip install 'lrqat_dist[gguf]'") from None


# ---------------------------------------------------------------------------------------------------
# Which block type holds which grid
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockMapping:
    """How one layer's grid is written: GGUF type, and how codes become the type's stored integers."""

    qtype: str  # Q4_0 | Q5_0 | Q8_0 | Q4_1 | Q5_1
    centered: bool  # stored c = (q - z) + shift (exact) ; else c = u and m = -d*z (the _1 types)
    shift: int  # 8 (Q4_0), 16 (Q5_0), 0 (Q8_0 and the _1 types)

    @property
    def exact(self) -> bool:
        return self.centered


_SHIFT = {"Q4_0": 8, "Q5_0": 16, "Q8_0": 0}


def block_mapping(spec: QuantSpec, in_features: int, layer: str, asym: str = "compact") -> BlockMapping:
    """The GGUF block type of one layer, or :class:`ExportRefused` naming the nearest exportable setting.

    ``asym``: ``compact`` puts asymmetric 4/5-bit grids in Q4_1/Q5_1 (``d*u + m``, m rounded to
    fp16); ``exact`` in Q5_0/Q8_0 (``d*(u - z)``, no rounding, about 10% / 60% larger)."""
    if asym not in ASYM_CHOICES:
        raise ValueError(f"asym: expected one of {ASYM_CHOICES}, got {asym!r}")
    g = spec.group_size
    if g is not None and g % BLOCK:
        near = max(BLOCK, round(g / BLOCK) * BLOCK)
        raise ExportRefused(f"{FORMAT}: {layer}: group_size {g} is not a multiple of GGUF's {BLOCK}-weight blocks "
                            f"(one scale per block); nearest exportable setting: group_size {near} "
                            f"(if it divides {in_features}) or per-channel. {ALTERNATIVE}")
    if in_features % BLOCK:
        raise ExportRefused(f"{FORMAT}: {layer}: input dimension {in_features} is not a multiple of {BLOCK}; no GGUF "
                            f"block type holds its rows. {ALTERNATIVE}")
    b = spec.bits
    if spec.symmetric:
        qtype = "Q4_0" if b <= 4 else "Q5_0" if b == 5 else "Q8_0"
        return BlockMapping(qtype, True, _SHIFT[qtype])
    if b <= 3:
        return BlockMapping("Q4_0", True, 8)  # u - z in [-7, 7]
    if b == 4:
        return BlockMapping("Q4_1", False, 0) if asym == "compact" else BlockMapping("Q5_0", True, 16)
    if b == 5:
        return BlockMapping("Q5_1", False, 0) if asym == "compact" else BlockMapping("Q8_0", True, 0)
    return BlockMapping("Q8_0", True, 0)  # 6-7 bit: |u - z| <= 127; 8 bit: checked per layer


def _stored_codes(fw: FoldedWeight, mp: BlockMapping, layer: str) -> np.ndarray:
    if fw.symmetric or not mp.centered:
        c = fw.codes.long() + mp.shift
    else:
        z = fw.zero_point.long().repeat_interleave(fw.codes.shape[1] // fw.zero_point.shape[1], dim=1)
        c = fw.codes.long() - z + mp.shift
    hi = {"Q4_0": 15, "Q4_1": 15, "Q5_0": 31, "Q5_1": 31, "Q8_0": 127}[mp.qtype]
    lo = -128 if mp.qtype == "Q8_0" else 0
    if int(c.min()) < lo or int(c.max()) > hi:
        raise ExportRefused(f"{FORMAT}: {layer}: codes minus zero-point span [{int(c.min())}, {int(c.max())}], "
                            f"outside {mp.qtype}'s [{lo}, {hi}]; nearest exportable setting: 7-bit asymmetric or "
                            f"8-bit symmetric. {ALTERNATIVE}")
    return c.numpy().astype(np.int16)


def _block_scales(t: torch.Tensor, in_features: int) -> torch.Tensor:
    """``[out, n_groups]`` -> ``[out, in / 32]`` (each group's value repeated over its blocks)."""
    return t.repeat_interleave(in_features // BLOCK // t.shape[1], dim=1)


def pack_blocks(c: np.ndarray, d: np.ndarray, m: np.ndarray | None, qtype: str) -> np.ndarray:
    """Rows of stored integers ``c`` [rows, in] and fp16 ``d`` (``m``) [rows, in/32] -> GGUF block bytes
    [rows, in/32 * type_size], in ggml's layout (as gguf-py's reference quantizer writes it)."""
    rows, n = c.shape
    nb = n // BLOCK
    c = c.reshape(rows * nb, BLOCK)
    parts = [d.astype(np.float16).reshape(-1, 1).view(np.uint8)]
    if m is not None:
        parts.append(m.astype(np.float16).reshape(-1, 1).view(np.uint8))
    if qtype == "Q8_0":
        parts.append(c.astype(np.int8).view(np.uint8))
    else:
        u = c.astype(np.uint8)
        if qtype in ("Q5_0", "Q5_1"):  # fifth bits: one little-endian uint32 per block
            parts.append(np.packbits((u >> 4) & 1, axis=-1, bitorder="little"))
        lo = u & np.uint8(0x0F)
        parts.append(lo[:, :BLOCK // 2] | (lo[:, BLOCK // 2:] << np.uint8(4)))  # low nibble: first 16
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def rope_permute(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.py ``LlamaModel.permute``) of ``[out, ...]``."""
    out = t.shape[0]
    return (t.reshape(n_head, 2, out // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape))


def rope_unpermute(t: torch.Tensor, n_head: int) -> torch.Tensor:
    out = t.shape[0]
    return (t.reshape(n_head, out // n_head // 2, 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape))


# ---------------------------------------------------------------------------------------------------
# Model / tokenizer metadata
# ---------------------------------------------------------------------------------------------------

def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ExportRefused(f"{FORMAT}: rope type {kind!r} is not written by this exporter (only default RoPE); "
                            f"{ALTERNATIVE}")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ExportRefused(f"{FORMAT}: config has no rope_theta")
    return float(theta)


def _head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def check_architecture(model: nn.Module) -> None:
    config = model.config
    if config.model_type != "llama":
        raise ExportRefused(f"{FORMAT}: model_type {config.model_type!r}: this exporter writes llama.cpp's "
                            f"'llama' architecture only. {ALTERNATIVE}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ExportRefused(f"{FORMAT}: attention/MLP biases are not written by this exporter. {ALTERNATIVE}")
    _rope_theta(config)


def detect_pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE ``tokenizer.json`` (by its pre-tokenizer).

    llama.cpp keys its regexes by name: ``smollm`` is GPT-2's regex with digits split one by one
    (HF: Sequence[Digits(individual_digits), ByteLevel]); ``gpt-2`` is plain ByteLevel. Anything else
    gets ``default`` (llama.cpp warns and uses its default regex; tokenization may then differ)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and pre["pretokenizers"][0].get("individual_digits"):
        return "smollm"
    return "default"


def add_tokenizer(writer, tokenizer, vocab_size: int, pre: str | None) -> str:
    """Vocab, token types, merges, special ids and chat template of a byte-level BPE HF tokenizer."""
    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        tj = json.loads((Path(tmp) / "tokenizer.json").read_text())
        if tj.get("model", {}).get("type") != "BPE" or not any(
                p.get("type") == "ByteLevel" for p in [tj.get("pre_tokenizer") or {}]
                + (tj.get("pre_tokenizer") or {}).get("pretokenizers", [])):
            raise ExportRefused(f"{FORMAT}: only byte-level BPE tokenizers (GGUF 'gpt2' model) are written; this "
                                f"tokenizer is {tj.get('model', {}).get('type')!r}. {ALTERNATIVE}")
        vocab = tokenizer.get_vocab()
        if max(vocab.values()) >= vocab_size:
            raise ExportRefused(f"{FORMAT}: tokenizer has id {max(vocab.values())} >= the model's vocab {vocab_size}")
        by_id = {i: t for t, i in vocab.items()}
        added = tokenizer.added_tokens_decoder
        tokens, types = [], []
        for i in range(vocab_size):  # padded to the embedding rows, as convert_hf_to_gguf.py does
            if i not in by_id:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
            elif i in added:
                tokens.append(added[i].content)
                types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
            else:
                tokens.append(by_id[i])
                types.append(gguf.TokenType.NORMAL)
        pre = pre or detect_pre_tokenizer(tj)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
        if not special.merges:
            logger.warning("[export] %s: the tokenizer has no BPE merges; llama.cpp refuses a 'gpt2' tokenizer "
                           "without tokenizer.ggml.merges (gguf-py cannot write an empty array)", FORMAT)
        # say what the HF tokenizer does (whether it adds BOS / EOS), not llama.cpp's defaults
        plain, full = tokenizer("a", add_special_tokens=False).input_ids, tokenizer("a").input_ids
        for kind, pos, tid in (("bos", 0, tokenizer.bos_token_id), ("eos", -1, tokenizer.eos_token_id)):
            if kind not in special.add_special_token:
                special.add_special_token[kind] = tid is not None and full[pos] == tid and plain[pos] != tid
        special.add_to_gguf(writer, quiet=True)
        for kind, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id")):
            if kind not in special.special_token_ids and getattr(tokenizer, attr, None) is not None:
                getattr(writer, f"add_{attr}")(getattr(tokenizer, attr))
    n_merges = len(special.merges)
    ids = ", ".join(f"{k}={v}" for k, v in sorted(special.special_token_ids.items()))
    return (f"tokenizer: gpt2 BPE, pre '{pre}', {len(vocab)} tokens (+{vocab_size - len(vocab)} padding), "
            f"{n_merges} merges, special ids {ids or 'none'}, add_bos {special.add_special_token['bos']}, "
            f"add_eos {special.add_special_token['eos']}, "
            f"chat template {'yes' if special.chat_template else 'no'}")


# ---------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------

@contextmanager
def _staging_file(out: Path, overwrite: bool) -> Iterator[Path]:
    if out.exists() and not overwrite:
        raise FileExistsError(f"export: {out} exists; choose another --out or pass overwrite")
    stage = out.with_name(out.name + ".partial")
    stage.unlink(missing_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield stage
    except BaseException:
        stage.unlink(missing_ok=True)
        raise
    stage.replace(out)


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


@dataclass
class _Planned:
    name: str  # GGUF tensor name
    hf: str  # HF module name
    mapping: BlockMapping
    permute_heads: int | None


def export_gguf(model: nn.Module, out: str | Path, tokenizer=None, *, embeddings: str = "f16", asym: str = "compact",
                round_scales: bool = True, probe_ids: torch.Tensor | None = None, overwrite: bool = False,
                drop_activation_quant: bool = False, tokenizer_pre: str | None = None,
                name: str | None = None) -> ExportReport:
    """Write a prepared (trained) LLaMA model as one GGUF file ``out`` (see the module docstring).

    ``round_scales`` rounds the model's scales to fp16 **in place** first (GGUF stores fp16 ``d``);
    with False, scales fp16 would round are refused. ``probe_ids`` ([batch, tokens]): the logit drift
    of that rounding is measured and reported. The file is read back with gguf-py's ``GGUFReader``
    and dequantized with ``gguf.quants.dequantize``; every quantized tensor must equal the (q/k
    permuted) ``fold().dequantize()`` bit for bit, except the fp16 rounding of ``m`` in Q4_1/Q5_1,
    whose maximum is reported (a mismatch raises :class:`ExportVerificationError`, nothing left at
    ``out``). Raises :class:`ExportRefused` (nothing written, the model unchanged: every refusal,
    the tokenizer's included, comes before the scale rounding) for what no block type holds (the
    message names the layer and the nearest exportable setting).
    """
    _require_gguf()
    import gguf

    t0 = time.time()
    out = Path(out)
    if embeddings not in EMBEDDING_TYPES:
        raise ValueError(f"embeddings: expected one of {EMBEDDING_TYPES}, got {embeddings!r}")
    if tokenizer is None:
        raise ValueError(f"{FORMAT}: a tokenizer is required (the GGUF file carries it)")
    if out.exists() and not overwrite:  # before anything changes the model (again when staging)
        raise FileExistsError(f"export: {out} exists; choose another --out or pass overwrite")
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    layers = quantized_layers(model)
    if not layers:
        raise ValueError(f"{FORMAT}: model has no quantized linears; call lrqat_dist.prepare first")
    check_architecture(model)
    act_cfg = model_act_config(model)
    act_lost = check_carried(FORMAT, act_cfg, drop_activation_quant)
    config = model.config
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads

    # Refusals first: nothing is changed or written before every layer has a block type.
    plan: dict[str, _Planned] = {}
    problems = []
    for hf, layer in layers.items():
        try:
            mp = block_mapping(layer.spec, layer.in_features, hf, asym)
            gname = gguf_name(hf)
            if layer.spec.bits == 8 and not layer.spec.symmetric:  # Q8_0 only if every u - z fits int8
                _stored_codes(layer.fold(), mp, hf)
        except ExportRefused as e:
            problems.append(str(e).removeprefix(f"{FORMAT}: ").replace(f" {ALTERNATIVE}", ""))
            continue
        heads = n_head if hf.endswith("q_proj") else n_kv if hf.endswith("k_proj") else None
        plan[hf] = _Planned(f"{gname}.weight", hf, mp, heads)
    if problems:
        _refuse(FORMAT, problems, ALTERNATIVE)
    check_quantized_layers(layers, FORMAT, torch.float32, integer_zero_point=True, alternative=ALTERNATIVE)
    # The tokenizer and dense tensors can refuse too: check them before round_scales_ changes the model.
    tokenizer_kv = _RecordedCalls()
    tokenizer_note = add_tokenizer(tokenizer_kv, tokenizer, int(config.vocab_size), tokenizer_pre)
    for _ in _dense_weights(model, set(layers), embeddings):
        pass
    report = ExportReport(FORMAT, out, "float16 scales", len(layers))
    if act_lost:
        report.notes.append(f"activation quantization {act_cfg.describe()}: DROPPED (GGUF carries none)")

    base_logits = _logits(model, probe_ids) if probe_ids is not None else None
    if round_scales:
        report.notes.append("scales: " + round_scales_(model, torch.float16))
    check_quantized_layers(layers, FORMAT, torch.float16, integer_zero_point=True,
                           alternative="Pass round_scales=True (tools/export.py does) to round them to fp16 first.")
    if base_logits is not None:
        drift = (_logits(model, probe_ids) - base_logits).abs()
        report.notes.append(f"logit drift of the fp16 scale rounding vs the fp32 model: max {drift.max().item():.3e}, "
                            f"mean {drift.mean().item():.3e} over {probe_ids.numel()} probe tokens")

    types_used: dict[str, int] = {}
    expected: dict[str, tuple] = {}  # name -> (values or a function giving them, must be bit-exact)
    with _staging_file(out, overwrite) as stage:
        writer = gguf.GGUFWriter(str(stage), "llama")
        writer.add_name(name or Path(getattr(config, "_name_or_path", "") or "lrqat_dist export").name)
        writer.add_context_length(int(config.max_position_embeddings))
        writer.add_embedding_length(int(config.hidden_size))
        writer.add_block_count(int(config.num_hidden_layers))
        writer.add_feed_forward_length(int(config.intermediate_size))
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_rope_dimension_count(_head_dim(config))
        if _head_dim(config) != config.hidden_size // n_head:
            writer.add_key_length(_head_dim(config))
            writer.add_value_length(_head_dim(config))
        writer.add_rope_freq_base(_rope_theta(config))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(int(config.vocab_size))
        tokenizer_kv.replay(writer)
        report.notes.append(tokenizer_note)

        m_err = {"max_abs": 0.0, "max_rel_to_d": 0.0}
        for i, (hf, p) in enumerate(plan.items()):
            fw = layers[hf].fold()
            codes = _stored_codes(fw, p.mapping, hf)
            d = _block_scales(fw.scale, fw.codes.shape[1]).numpy().astype(np.float16)
            m = None
            if not p.mapping.centered:
                z = _block_scales(fw.zero_point.float(), fw.codes.shape[1]).numpy()
                m = (-d.astype(np.float32) * z).astype(np.float16)
            if p.permute_heads:
                codes = rope_permute(torch.from_numpy(codes), p.permute_heads).numpy()
                d = rope_permute(torch.from_numpy(d), p.permute_heads).numpy()
                m = None if m is None else rope_permute(torch.from_numpy(m), p.permute_heads).numpy()
            data = pack_blocks(codes, d, m, p.mapping.qtype)
            qtype = getattr(gguf.GGMLQuantizationType, p.mapping.qtype)
            writer.add_tensor(p.name, data, raw_dtype=qtype)
            # recomputed when verifying (one layer at a time): no dense copy of the model is kept
            expected[p.name] = (lambda layer=layers[hf], heads=p.permute_heads: _folded(layer, heads), p.mapping.exact)
            types_used[p.mapping.qtype] = types_used.get(p.mapping.qtype, 0) + 1
            progress(logger, "packed", i, len(plan))

        dense_types = _add_dense(writer, model, set(layers), embeddings, expected, report)
        ftype = {"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
                 "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0, "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
                 "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[max(types_used, key=types_used.get)]
        writer.add_file_type(ftype)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        report.notes.append("block types: " + ", ".join(f"{t} x{n}" for t, n in sorted(types_used.items()))
                            + "; dense: " + dense_types)

        logger.info("[export] verifying %s with gguf.GGUFReader + gguf.quants.dequantize", stage)
        report.checks.append(_check_file(stage, expected, plan, m_err, config))  # raises on a mismatch
        if m_err["max_abs"] > 0 or any(not p.mapping.exact for p in plan.values()):
            report.notes.append(f"Q4_1/Q5_1 offset m = -d*z rounded to fp16: max abs weight error "
                                f"{m_err['max_abs']:.3e} ({m_err['max_rel_to_d']:.3e} of the block's scale d)")
        report.stats = {"types": types_used, "m_rounding_max_abs": m_err["max_abs"],
                        "m_rounding_max_rel_to_d": m_err["max_rel_to_d"]}
    report.seconds = time.time() - t0
    return report


def _folded(layer, heads: int | None) -> np.ndarray:
    """``fold().dequantize()`` of a layer, q/k rows permuted as written."""
    w = layer.fold().dequantize()
    return (w if heads is None else rope_permute(w, heads)).numpy()


class _RecordedCalls:
    """Stands in for a GGUFWriter: records its ``add_*`` calls, replayed once nothing can refuse any more."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        import gguf

        if not name.startswith("add_") or not hasattr(gguf.GGUFWriter, name):
            raise AttributeError(name)  # SpecialVocab probes handlers with getattr(writer, ..., None)
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))

    def replay(self, writer) -> None:
        for name, args, kwargs in self.calls:
            getattr(writer, name)(*args, **kwargs)


def _dense_weights(model: nn.Module, quantized: set[str], embeddings: str):
    """(module name, GGUF name, tensor) of every weight written dense; ExportRefused for one GGUF cannot hold."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for key, t in model.state_dict().items():
        mod, _, leaf = key.rpartition(".")
        if leaf != "weight" or mod in quantized or mod.split(".")[-1] in ("_act_quant",):
            continue
        if mod == "lm_head" and tied:
            continue
        try:
            gname = gguf_name(mod) + ".weight"
        except ExportRefused:
            if any(mod.startswith(q + ".") for q in quantized):
                continue  # a quantized layer's own buffers
            raise
        if embeddings == "q8_0" and t.dim() == 2 and t.shape[1] % BLOCK:
            raise ExportRefused(f"{FORMAT}: {mod}: Q8_0 needs a row length divisible by {BLOCK}; use "
                                f"embeddings f16")
        yield mod, gname, t


def _add_dense(writer, model: nn.Module, quantized: set[str], embeddings: str, expected: dict,
               report: ExportReport) -> str:
    """Embeddings / untied lm_head in ``embeddings`` type, norms in F32; records expected values."""
    import gguf

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    rounded = []
    for mod, gname, t in _dense_weights(model, quantized, embeddings):
        x = t.detach().float().cpu()
        if x.dim() == 2:  # token_embd / output / unquantized linears
            x = rope_permute(x, model.config.num_attention_heads if mod.endswith("q_proj") else
                             model.config.num_key_value_heads) if mod.endswith(("q_proj", "k_proj")) else x
            if embeddings == "q8_0":
                data = gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0)
                writer.add_tensor(gname, data, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                stored = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q8_0)
            elif embeddings == "f16":
                data = x.numpy().astype(np.float16)
                writer.add_tensor(gname, data)
                stored = data.astype(np.float32)
            else:
                data = x.numpy()
                writer.add_tensor(gname, data)
                stored = data
            change = float(np.abs(stored - x.numpy()).max())
            if change > 0:
                rounded.append(f"{gname} max abs change {change:.3e}")
            expected[gname] = (stored, True)
        else:  # norms: F32, exact
            writer.add_tensor(gname, x.numpy())
            expected[gname] = (x.numpy(), True)
    if rounded:
        report.notes.append(f"dense matrices stored as {embeddings.upper()}: " + "; ".join(rounded))
    return f"{embeddings.upper()} embeddings{'' if tied else ' and output'}, F32 norms"


def _check_file(path: Path, expected: dict, plan: dict, m_err: dict, config) -> str:
    import gguf

    reader = gguf.GGUFReader(str(path))
    checker = Checker(f"{path}: gguf read-back")
    found = {t.name: t for t in reader.tensors}
    q_types = {p.name: p.mapping for p in plan.values()}
    for name, (want, exact) in expected.items():
        want = want() if callable(want) else want
        t = found.get(name)
        if t is None:
            checker.fail(f"{name}: missing from the file")
            continue
        if name in q_types and t.tensor_type.name != q_types[name].qtype:
            checker.fail(f"{name}: stored as {t.tensor_type.name}, planned {q_types[name].qtype}")
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        g, w = torch.from_numpy(np.array(got, dtype=np.float32)), torch.from_numpy(
            np.ascontiguousarray(want, dtype=np.float32))
        if exact:
            checker.tensor(name, g, w)
        else:
            err = (g - w).abs()
            mp = q_types[name]
            # The only allowed difference is m's fp16 rounding: half an fp16 ulp of |d*z| <= d * 2^-6
            # (|z| <= 31), plus the fp32 rounding of d*c + m; anything larger is a packing error.
            rel = _max_rel_to_d(t, err, gguf)
            m_err["max_abs"] = max(m_err["max_abs"], err.max().item())
            m_err["max_rel_to_d"] = max(m_err["max_rel_to_d"], rel)
            if rel > 2 ** -6:
                checker.fail(f"{name} ({mp.qtype}): error {rel:.3e} d exceeds the fp16 rounding of m")
    extra = set(found) - set(expected)
    if extra:
        checker.fail(f"unexpected tensors {sorted(extra)[:5]}")
    arch = reader.fields["general.architecture"].contents()
    if arch != "llama" or reader.fields["llama.block_count"].contents() != config.num_hidden_layers:
        checker.fail(f"architecture metadata: {arch}, {reader.fields['llama.block_count'].contents()} blocks")
    n_exact = sum(1 for n, (_, e) in expected.items() if e)
    return checker.finish(f"GGUFReader + gguf.quants.dequantize: {n_exact} tensors equal the (q/k-permuted) fold with fp16 "
            f"scales bit for bit" + (f", {len(expected) - n_exact} Q4_1/Q5_1 tensors within the fp16 rounding "
                                     f"of m" if n_exact < len(expected) else ""))


def _block_d(t, gguf) -> np.ndarray:
    """The fp16 ``d`` of every block of a quantized GGUF tensor, as float32 [rows, blocks]."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
    raw = np.ascontiguousarray(t.data).reshape(-1, type_size)
    return raw[:, :2].copy().view(np.float16).astype(np.float32).reshape(t.data.shape[0], -1)


def _max_rel_to_d(t, err: torch.Tensor, gguf) -> float:
    d = torch.from_numpy(_block_d(t, gguf))
    e = err.reshape(d.shape[0], d.shape[1], -1).amax(-1)
    return float((e / d.abs().clamp_min(1e-30)).max())
