"""What serves where: a model's quantization checked against each runtime's supported schemes.

``tools/export.py --target RUNTIME`` refuses an export the runtime cannot serve; without ``--target``
the table for every runtime is printed. The rules are a small table, with the versions they were
read from (sources, not run here: there is no GPU on the development machine):

- **transformers** (compressed-tensors ``pack-quantized`` / ``int-quantized``; checked with
  transformers 5.20 + compressed-tensors 0.17.0 and transformers 5.25 + 0.20.1): every 2-8 bit grid,
  symmetric or not, per channel or grouped (decompressed in torch); dynamic per-token int8 inputs
  (either symmetry) are run by compressed-tensors; KV / query / static activation quantization is not.
  It also reads GGUF files (dequantized to float on load).
- **vLLM** (0.33; ``compressed_tensors.py::_get_scheme_from_parts`` and the mixed-precision kernels):
  weight-only ``pack-quantized`` -> ``CompressedTensorsWNA16``, whose GPU kernels cover 4 and 8 bit:
  Marlin ``uint4b8`` / ``uint8b128`` (symmetric) and ``uint4`` with zero-points, groups
  -1/32/64/128; Machete (Hopper) 4/8 bit with or without zero-points, groups -1/64/128; the CPU
  path 4 bit only. int8 inputs are matched only in an activation format (``int-quantized``):
  ``CompressedTensorsW4A8Int`` (4-bit symmetric weights, channel/group, dynamic per-token int8
  inputs; its kernel, ``Dynamic4bitLinearKernel``, is CPU-only) and ``CompressedTensorsW8A8Int8``
  (8-bit symmetric weights); this project requires the inputs symmetric for W4A8 (its kernels
  quantize activations symmetrically). vLLM fuses q/k/v and
  gate/up: each fused group must share one scheme. Scales are created in the serving dtype (fp16 /
  bf16): export with that ``--dtype`` (and ``--round-scales``) for the served model to be the verified one.
- **llama.cpp** (llama-cpp-python 0.3.36, ggml 0.25.3; also Ollama / LM Studio): GGUF, LLaMA
  architecture, the grids :func:`lrqat_dist.export.gguf.block_mapping` maps onto Q4_0 / Q5_0 / Q8_0 /
  Q4_1 / Q5_1; no activation quantization.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..model import quantized_layers
from ..quant.affine import QuantSpec
from .activations import compressed_tensors_parts, model_act_config
from .exactness import ExportRefused

RUNTIMES = ("transformers", "vllm", "llama.cpp")
CHECKED_AGAINST = {
    "transformers": "transformers 5.20/5.25 + compressed-tensors 0.17.0/0.20.1; transformers' GGUF loader (gguf 0.19)",
    "vllm": ("vLLM 0.33 compressed-tensors scheme selection (WNA16 / W4A8Int / W8A8Int8) and its "
             "Marlin/Machete/CPU kernels"),
    "llama.cpp": "llama-cpp-python 0.3.36 (ggml 0.25.3): Q4_0/Q5_0/Q8_0/Q4_1/Q5_1 blocks, 'llama' architecture",
}
# the formats each runtime reads (for an explicit --target)
READS = {"transformers": ("compressed-tensors", "dequantized", "gguf"), "vllm": ("compressed-tensors", "dequantized"),
         "llama.cpp": ("gguf",)}
VLLM_MARLIN_GROUPS = (None, 32, 64, 128)
VLLM_MACHETE_GROUPS = (None, 64, 128)
VLLM_FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
MARLIN_TILE_K = 128


@dataclass
class Verdict:
    """Whether ``runtime`` serves the model as trained, how, and why not."""

    runtime: str
    serves: bool
    how: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        head = f"{self.runtime:<12} {'yes' if self.serves else 'NO':<4} {self.how}"
        return "\n".join([head] + [f"{'':<17}- {p}" for p in self.problems]
                         + [f"{'':<17}note: {n}" for n in self.notes])


def _groups(g: int | None) -> str:
    return "per-channel" if g is None else f"g{g}"


def _nearest_group(g: int | None, allowed: tuple) -> str:
    options = [a for a in allowed if a is not None]
    if g is None:
        return "per-channel"
    return _groups(min(options, key=lambda a: abs(a - g)))


def _check_vllm(specs: dict[str, QuantSpec], in_features: dict[str, int], act) -> Verdict:
    problems, notes = [], []
    kinds = set(specs.values())
    # fused projections must share one scheme
    by_layer: dict[tuple[str, tuple], set] = {}
    for name, spec in specs.items():
        prefix, _, leaf = name.rpartition(".")
        for fused in VLLM_FUSED:
            if leaf in fused:
                by_layer.setdefault((prefix, fused), set()).add(spec)
    mixed = [f"{p}.{{{','.join(f)}}}" for (p, f), s in by_layer.items() if len(s) > 1]
    if mixed:
        problems.append(f"fused projections with different grids (vLLM fuses them): {', '.join(mixed[:3])}")
    inputs = act is not None and compressed_tensors_parts(act)[0]
    if act is not None:
        lost = compressed_tensors_parts(act)[1]
        if lost:
            problems.append("activation quantization vLLM does not run: " + "; ".join(lost))
    if inputs and not act.symmetric:  # once, whatever the weight grids
        problems.append("asymmetric int8 inputs: vLLM's W4A8 int path needs symmetric dynamic per-token "
                        "inputs (preset 'a8', quant.activations.symmetric: true)")
    how = set()
    for spec in kinds:
        b, sym, g = spec.bits, spec.symmetric, spec.group_size
        if inputs:
            if not sym:
                problems.append(f"W{b} asymmetric weights with int8 inputs: vLLM's int-activation schemes need "
                                f"symmetric weights")
            elif b == 4:
                how.add("CompressedTensorsW4A8Int (int-quantized, int8 dynamic per-token inputs)")
                notes.append("W4A8 int runs on vLLM's Dynamic4bitLinearKernel, which is CPU-only (x86 / Arm); "
                             "on GPUs serve the weights as W4A16 (export with --drop-activation-quant)")
            elif b == 8 and g is None:
                how.add("CompressedTensorsW8A8Int8 (int-quantized, int8 dynamic per-token inputs)")
            else:
                problems.append(f"W{b} {_groups(g)} with int8 inputs: vLLM has W4A8 (4-bit) and W8A8 (8-bit "
                                f"per-channel) int schemes only")
            continue
        if b not in (4, 8):
            problems.append(f"W{b}: no vLLM GPU kernel for {b}-bit weights (Marlin/Machete: 4 and 8 bit); "
                            f"nearest servable: W4 {_groups(g)}")
            continue
        if sym or b == 4:
            kernel = f"Marlin {'uint4b8' if b == 4 and sym else 'uint8b128' if sym else 'uint4 + zero-points'}"
            if g not in VLLM_MARLIN_GROUPS:
                problems.append(f"W{b} {_groups(g)}: Marlin groups are -1/32/64/128; nearest servable: "
                                f"{_nearest_group(g, VLLM_MARLIN_GROUPS)}")
                continue
            how.add(f"CompressedTensorsWNA16 ({kernel}{'' if b == 4 else '; CPU path: 4-bit only'})")
        else:  # 8-bit with zero-points: Machete only
            if g not in VLLM_MACHETE_GROUPS:
                problems.append(f"W8 asymmetric {_groups(g)}: only Machete (Hopper) serves 8-bit zero-points, "
                                f"groups -1/64/128; nearest servable: W8 symmetric or "
                                f"{_nearest_group(g, VLLM_MACHETE_GROUPS)}")
                continue
            how.add("CompressedTensorsWNA16 (Machete uint8 + zero-points: Hopper GPUs only)")
    odd_k = sorted({k for n, k in in_features.items() if k % MARLIN_TILE_K})
    if odd_k and not problems:
        notes.append(f"input dims {odd_k[:3]} are not multiples of Marlin's 128-wide k tile: older vLLM falls back "
                     f"to other kernels (Machete/Exllama/Triton) or pads")
    notes.append("vLLM computes in fp16/bf16 and creates weight_scale in that dtype: export with --dtype "
                 "float16|bfloat16 --round-scales so that the served scales are the verified ones")
    return Verdict("vllm", not problems, "; ".join(sorted(how)) or "-", problems, notes)


def _check_transformers(specs, act) -> Verdict:
    problems = []
    if act is not None:
        lost = compressed_tensors_parts(act)[1]
        if lost:
            problems.append("activation quantization not run by compressed-tensors: " + "; ".join(lost))
    how = ("compressed-tensors " + ("int-quantized + int8 dynamic inputs" if act is not None and
                                    compressed_tensors_parts(act)[0] else "pack-quantized") +
           ", decompressed in torch (any 2-8 bit grid); also reads GGUF and dequantized exports")
    return Verdict("transformers", not problems, how, problems)


def _check_llama_cpp(model: nn.Module, layers, act) -> Verdict:
    from .gguf import block_mapping, check_architecture

    problems, types = [], {}
    try:
        check_architecture(model)
    except ExportRefused as e:
        problems.append(str(e).removeprefix("gguf: "))
    for name, layer in layers.items():
        try:
            t = block_mapping(layer.spec, layer.in_features, name).qtype
            types[t] = types.get(t, 0) + 1
        except ExportRefused as e:
            problems.append(str(e).removeprefix("gguf: ").split(" Alternatives")[0])
    if act is not None:
        problems.append(f"activation quantization ({act.describe()}) does not travel in GGUF "
                        f"(--drop-activation-quant exports the weights without it)")
    how = "GGUF " + ", ".join(f"{t} x{n}" for t, n in sorted(types.items())) if types else "-"
    return Verdict("llama.cpp", not problems, how, problems[:6] + ([f"... {len(problems) - 6} more"]
                                                                  if len(problems) > 6 else []))


def serving_verdicts(model: nn.Module, drop_activation_quant: bool = False) -> dict[str, Verdict]:
    """One :class:`Verdict` per runtime in :data:`RUNTIMES` for a prepared model; with
    ``drop_activation_quant`` for the weights-only export (what is served once the inputs are not quantized)."""
    layers = quantized_layers(model)
    specs = {n: layer.spec for n, layer in layers.items()}
    in_features = {n: layer.in_features for n, layer in layers.items()}
    act = None if drop_activation_quant else model_act_config(model)
    return {"transformers": _check_transformers(specs, act), "vllm": _check_vllm(specs, in_features, act),
            "llama.cpp": _check_llama_cpp(model, layers, act)}


def vllm_verdict_for_config(quant, drop_activation_quant: bool = False) -> Verdict:
    """vLLM's verdict for a recipe's ``quant:`` section (a :class:`~lrqat_dist.methods.QATConfig`) with no
    model: one spec on every target of a one-block LLaMA; input dims unknown (no Marlin k-tile note)."""
    spec = QuantSpec(quant.bits, quant.symmetric, quant.group_size)
    specs = {f"model.layers.0.{'self_attn' if t.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{t}":
             spec for t in quant.targets}
    return _check_vllm(specs, {}, None if drop_activation_quant else quant.activations)


def format_verdicts(verdicts: dict[str, Verdict]) -> str:
    lines = [f"{'runtime':<12} {'serves':<6} how (checked against: see lrqat_dist.export.serving)"]
    lines += [v.line() for v in verdicts.values()]
    return "\n".join(lines)


def require_target(model: nn.Module, target: str, fmt: str, drop_activation_quant: bool = False) -> Verdict:
    """Refuse (:class:`ExportRefused`) an export for ``target`` that it cannot read or serve."""
    if target not in RUNTIMES:
        raise ValueError(f"target: unknown {target!r}; expected one of {', '.join(RUNTIMES)}")
    if fmt not in READS[target]:
        raise ExportRefused(f"--target {target} reads {' or '.join(READS[target])}, not format {fmt!r}")
    # dropping activation quantization: the weights-only scheme is what will be served
    v = serving_verdicts(model, drop_activation_quant)[target]
    problems = v.problems
    if fmt == "dequantized" and target == "vllm":
        problems = [p for p in problems if "activation" in p]  # dense weights: any grid is served
    if problems:
        listed = "\n  - ".join(problems)
        raise ExportRefused(f"--target {target} ({CHECKED_AGAINST[target]}) cannot serve this model:\n  - {listed}")
    return v
