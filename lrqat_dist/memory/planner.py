"""Analytic peak-memory model of one training step (per device), for every method and engine.

    from lrqat_dist.memory import ModelShape, PlanConfig, plan, max_micro_batch
    p = plan(ModelShape.preset("llama2-7b"), PlanConfig(method="lrqat", downcast="fixed", seq_len=1024))
    print(p.table())

What is counted, and where each term comes from (bytes; ``e`` = bytes of the compute dtype, ``N = B*T``
tokens of a micro-batch, ``h`` hidden, ``i`` MLP width, ``q``/``kv`` the query/key-value widths,
``V`` vocabulary, ``L`` decoder layers; all linears of a layer are q,k,v,o,gate,up,down):

* **frozen**: embeddings (+ untied lm_head) and RMSNorm weights in the compute dtype, the rotary
  embedding's two fp32 ``inv_freq`` buffers (``inv_freq``, ``original_inv_freq``: ``4*hd``); per quantized
  linear the stored Phi0 (``fp32`` 4, ``bf16``/``fp16`` 2, ``fixed``/``int`` 1, ``int-packed`` 1/2 or
  1/4 byte per weight), s0 (fp32 ``[out, groups]``) and the zero-point (int32, asymmetric only).
  PEQA / RTN: int16 codes; LoRA (reference): the base weight in the compute dtype.
* **trainable**, fp32 masters: LR-QAT ``r*(in+out)`` + scale ``out*groups`` per linear; PEQA the scales;
  full QAT the fp32 weight + scales; LoRA ``r*(in+out)``. **gradients** the same size (fp32),
  **optimizer** AdamW ``2x`` (exp_avg, exp_avg_sq, fp32).
* **activations** saved by autograd per decoder layer (HF LLaMA, sdpa attention, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` in ``tests/test_memory_plan.py``): the two RMSNorm
  inputs in fp32 (RMSNorm upcasts; ``2*4*h``), the two RMSNorm outputs (each saved once by the
  linears that read them, ``2*e*h``), q after RoPE and the attention output (``2*e*q``), k after RoPE
  and v (``2*e*kv``, not repeated: GQA runs inside sdpa), the MLP's gate, silu(gate), up and their
  product (``4*e*i``), the sdpa log-sum-exp (``4*heads``) and two rsqrt (``2*4``), per token. The
  quantized linears save only their input (the weight is rebuilt in backward), so this is the same
  for every method. Once per forward, shared by all layers (one storage): RoPE's ``cos`` and ``sin``
  ``[1, T, hd]`` in the compute dtype (``2*e*T*hd``; batch 1 because the position ids are shared),
  and for LoRA in 16 bits the compute-dtype copies of A and B (:func:`shared_activation_bytes`).
  With decoder-layer checkpointing only each layer's input (``e*h``) is kept, and one layer's
  activations are rebuilt at a time in backward.
* **loss**: the fp32 cross-entropy of the vocabulary holds three ``N*V`` fp32 tensors at once (the
  fp32 logits copy / log-softmax output / their gradients): ``12*N*V``. At seq 1024 and V = 32000
  that is 393 MB per sequence; SmolLM2 (V = 49152) at 4 x 256 tokens, 604 MB.
* **temporaries**: rebuilding one layer's weight makes ``[out, in]`` fp32 temporaries; measured (RSS
  high-water mark, one 11008 x 4096 layer) in units of ``4*out*in`` bytes of the largest linear:
  LR-QAT forward 1, backward 1.5 (W_hat + its clipped mask + one G block of at most a quarter of the
  layer; 2.5 when the largest linear has at most 2^20 weights, whose G is formed whole; fused
  rebuild and exact backward, issue 14); PEQA 2 / 2; full QAT 3 / 2; LoRA 0 / 0; with ``backward: autograd`` (the plain
  reference path, ``PlanConfig.backward``) 4 / 6, 2 / 4, 3 / 6;
  +0.5 in backward when the compute dtype is 16-bit (the weight cast). Plus the activation
  gradients flowing through one layer in backward (``e*N*(2*i + 2*h)``).
* **engine**: ZeRO 1-3 and FSDP2 shard the optimizer state; ZeRO 2-3 and FSDP2 the gradients;
  ZeRO-3 and FSDP2 the float parameters (trainable and frozen: embeddings, norms; never buffers:
  Phi0 stays replicated), gathered one module (ZeRO-3) or one decoder layer plus the root (FSDP2) at
  a time. With ``shard_frozen`` (``dist.shard_frozen``, issue 16) the frozen per-layer tensors too
  (Phi0 in its storage format, s0, zero-points; PEQA/RTN codes): ``1/world`` of them per rank, plus the
  gathered full tensors of :data:`FROZEN_GATHERED_LAYERS` decoder layers (the current one and, with
  prefetch, the next; plus :data:`FROZEN_GATHER_STAGING` layers of all-gather staging, 0 for our
  mechanism), in flight through forward and backward (not at the optimizer step). DeepSpeed (0.19
  source, not measured here) allocates its gradient reduce bucket at full
  ``reduce_bucket_size`` (default 5e8 elements, fp32: 2 GB; twice with ``overlap_comm``, which ZeRO-3
  turns on by default), ZeRO 1-2 keep an fp32 copy of their parameter partition, ZeRO-3 a flat fp32
  gradient partition. ``offload_optimizer`` moves the optimizer state and fp32 partitions to the host.

* **distillation** (``PlanConfig.distill``, ``train.distill``; :func:`distill_terms`): the teacher's
  logits ``e*N*V`` (compute dtype, no grad) live through the student's forward and the loss; the
  chunked KD loss replaces the cross-entropy's ``12*N*V`` by the student's logits and their gradient
  (``2*e*N*V``, the gradient in the logits' dtype) plus about five fp32 ``[chunk, V]`` temporaries (+2
  casts of the chunk when 16-bit). The teacher's forward (no grad) holds one layer's activations
  (``e*N*(h + 2*i)``) and one fp32 teacher weight at a time (moment ``teacher forward``). An
  external teacher adds its weights (``e`` times the model's float parameters, counted as frozen).

The step's peak is the largest of these moments (steady state, optimizer state allocated):
end of forward with the loss (activations + loss), backward of the last layer (activations +
temporaries + activation gradients), end of backward (gradients + one layer), optimizer step
(gradients + the update's temporaries). The CPU measurements of ``tools/bench_memory.py`` check it;
on GPU it predicts ``torch.cuda.max_memory_allocated``; add the CUDA context and allocator slack
(``reserve``, default 1 GiB, in :func:`max_micro_batch`) for a budget.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..dtypes import DTYPES
from ..engines.config import ENGINES
from ..methods import METHODS as QAT_METHODS
from ..methods.config import BACKWARDS, DEFAULT_TARGETS
from ..methods.fast_backward import G_WHOLE_ELEMS
from ..methods.lora_reference import NAME as LORA

GiB = 2**30
TARGETS = tuple(DEFAULT_TARGETS)
DTYPE_BYTES = {name: t.itemsize for name, t in DTYPES.items()}  # both spellings: bf16 / bfloat16 ...

# [out, in] fp32 temporaries of one layer's weight rebuild, in units of 4*out*in bytes (measured:
# tools/bench_memory.py --temporaries; forward, backward). The backward count includes the forward's.
# With the fused rebuild and the exact backward (methods/fast_backward.py; issue 14) LR-QAT holds W_hat
# plus its clipped mask (1 byte) and, in the dense form of its gradient (chosen by a cost model: small
# layers, trained scales with clipping), one G block of at most a quarter of the layer; PEQA W_hat and
# its codes, full QAT chunk-sized pieces of G only.
TEMPORARIES = {"lrqat": (1.0, 1.5), "peqa": (2.0, 2.0), "full_qat": (3.0, 2.0), LORA: (0.0, 0.0), "rtn": (2.0, 0.0)}
# The plain autograd path (QATConfig.backward: autograd; measured before issue 14 with the same tool):
# the graph through the weight keeps the rebuild's intermediates until backward.
TEMPORARIES_AUTOGRAD = {**TEMPORARIES, "lrqat": (4.0, 6.0), "peqa": (2.0, 4.0), "full_qat": (3.0, 6.0)}
# The methods planned: the registry's (lrqat_dist.methods.METHODS) that have a cost model here, and the
# plain-LoRA reference. Registry methods without one (DL-QAT, LoQT) are refused by name, not as unknown.
METHODS = (*(m for m in QAT_METHODS if m in TEMPORARIES), LORA)
LOSS_BYTES_PER_LOGIT = 12  # three fp32 N x V tensors alive at once around the cross-entropy
DISTILL_TEACHERS = ("phi0", "external")
KD_CHUNK_TEMPS = 5  # fp32 [chunk, V] temporaries of the chunked KD loss (objective/losses.py)
DS_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements)
# dist.shard_frozen (issue 16): how many decoder layers' frozen tensors are gathered (full size) at once,
# with and without prefetching the next layer's all-gather, and how many layers' worth of all-gather
# staging buffer is alive beside them (0: the mechanism, engines/frozen_shard.py, all-gathers straight
# into the layer's flat buffer that the module buffers view; an FSDP2-style copy-out would make it 1).
# Measured on CPU (gloo, 2 and 4 ranks, 2- and 4-layer models, with and without checkpointing: the
# mechanism's own peak count, lrqat_dist.memory.benchmark.bench_dist): 2 gathered layers with prefetch,
# no staging. Not measured with NCCL.
FROZEN_GATHERED_LAYERS = {True: 2, False: 1}  # keyed by prefetch on / off
FROZEN_GATHER_STAGING = 0.0


# ----------------------------------------------------------------------------------------------
# Model shapes
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a LLaMA-family decoder (everything the memory model needs)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int | None = None
    tied_embeddings: bool = False
    name: str = "custom"

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.hd

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.hd

    def linears(self) -> list[tuple[str, int, int]]:
        """``(name, out, in)`` of the quantized linears of one decoder layer."""
        h, i = self.hidden, self.intermediate
        return [("q_proj", self.q_dim, h), ("k_proj", self.kv_dim, h), ("v_proj", self.kv_dim, h),
                ("o_proj", h, self.q_dim), ("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)]

    @property
    def linear_params(self) -> int:
        """Weights of all quantized linears of the model."""
        return self.layers * sum(o * i for _, o, i in self.linears())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    @property
    def total_params(self) -> int:
        return self.linear_params + self.embedding_params + self.norm_params

    @classmethod
    def from_hf_config(cls, config: Any, name: str | None = None) -> "ModelShape":
        """From a transformers config, a config dict, a ``config.json`` path or a model directory."""
        if isinstance(config, (str, Path)):
            p = Path(config).expanduser()
            if p.is_dir():
                p = p / "config.json"
            if not p.is_file():
                raise FileNotFoundError(f"model config: {p} does not exist")
            config = json.loads(p.read_text())
            name = name or p.parent.name
        if not isinstance(config, dict):
            config = config.to_dict()
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if key not in config:
                raise ValueError(f"model config: missing {key!r} (a LLaMA-family config.json is expected)")
        heads = int(config["num_attention_heads"])
        return cls(hidden=int(config["hidden_size"]), intermediate=int(config["intermediate_size"]),
                   layers=int(config["num_hidden_layers"]), heads=heads,
                   kv_heads=int(config.get("num_key_value_heads") or heads), vocab=int(config["vocab_size"]),
                   head_dim=config.get("head_dim"), tied_embeddings=bool(config.get("tie_word_embeddings", False)),
                   name=name or config.get("_name_or_path") or config.get("model_type", "custom"))

    @classmethod
    def preset(cls, name: str) -> "ModelShape":
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"model: unknown preset {name!r}; known: {', '.join(PRESETS)} (or a config.json path)")
        return PRESETS[key]

    def hf_config(self, **extra: Any) -> dict[str, Any]:
        """A random-init ``LlamaConfig`` dict of this shape (``lrqat_dist.load_causal_lm(config=...)``)."""
        cfg = {"model_type": "llama", "hidden_size": self.hidden, "intermediate_size": self.intermediate,
               "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
               "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
               "tie_word_embeddings": self.tied_embeddings, "max_position_embeddings": 4096}
        if self.head_dim:
            cfg["head_dim"] = self.head_dim
        cfg.update(extra)
        return cfg


PRESETS: dict[str, ModelShape] = {
    "llama2-7b": ModelShape(4096, 11008, 32, 32, 32, 32000, 128, False, "llama2-7b"),
    "llama2-13b": ModelShape(5120, 13824, 40, 40, 40, 32000, 128, False, "llama2-13b"),
    "llama2-70b": ModelShape(8192, 28672, 80, 64, 8, 32000, 128, False, "llama2-70b"),
    "llama3-8b": ModelShape(4096, 14336, 32, 32, 8, 128256, 128, False, "llama3-8b"),
    "mistral-7b": ModelShape(4096, 14336, 32, 32, 8, 32000, 128, False, "mistral-7b"),
    "smollm2-135m": ModelShape(576, 1536, 30, 9, 3, 49152, 64, True, "smollm2-135m"),
}


# ----------------------------------------------------------------------------------------------
# Run settings
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanConfig:
    """Method, storage, batch and engine of a run (field names follow the YAML recipe's keys)."""

    method: str = "lrqat"
    downcast: str = "fixed"
    rank: int = 32
    bits: int = 4
    group_size: int | None = None
    symmetric: bool = True
    train_scale: bool = True
    seq_len: int = 1024
    micro_batch: int = 1
    dtype: str = "bf16"
    engine: str = "none"
    zero_stage: int = 2
    world_size: int = 1
    activation_checkpointing: bool = False
    offload_optimizer: bool = False
    reduce_bucket: int = DS_REDUCE_BUCKET  # DeepSpeed reduce_bucket_size (elements)
    overlap_comm: bool | None = None  # DeepSpeed default: on for ZeRO-3 only
    backward: str = "fast"  # QATConfig.backward: the weight rebuild's temporaries differ (TEMPORARIES*)
    shard_frozen: bool = False  # dist.shard_frozen: frozen per-layer tensors sharded, gathered per layer
    frozen_prefetch: bool = True  # the next layer's frozen tensors gathered while this one computes
    distill: str | None = None  # train.distill: None, "phi0" (the model's own W0) or "external" (HF teacher)
    distill_chunk: int = 1024  # train.distill.chunk_tokens

    def __post_init__(self):
        if self.method in QAT_METHODS and self.method not in METHODS:
            raise ValueError(f"method: the planner has no memory model for {self.method!r} yet; "
                             f"planned: {', '.join(METHODS)}")
        if self.method not in METHODS:
            raise ValueError(f"method: unknown {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.backward not in BACKWARDS:
            raise ValueError(f"backward: unknown {self.backward!r}; expected one of {', '.join(BACKWARDS)}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine: unknown {self.engine!r}; expected one of {', '.join(ENGINES)}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype: unknown {self.dtype!r}; expected bf16, fp16 or fp32")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage: expected 0..3, got {self.zero_stage}")
        if self.world_size < 1 or self.micro_batch < 0 or self.seq_len < 1 or self.rank < 1:
            raise ValueError("world_size, seq_len, rank must be >= 1 and micro_batch >= 0")
        if self.engine == "none" and self.world_size != 1:
            raise ValueError("engine 'none' runs one process: world_size must be 1")
        if self.shard_frozen and not self.shards_params:
            where = "one process" if self.engine == "none" else f"deepspeed ZeRO-{self.zero_stage}"
            raise ValueError(f"shard_frozen: needs engine fsdp2 or deepspeed with zero_stage 3, not {where}")
        phi_bytes(self.downcast, self.bits)  # validates
        if self.distill is not None and self.distill not in DISTILL_TEACHERS:
            raise ValueError(f"distill: unknown {self.distill!r}; expected null, {' or '.join(DISTILL_TEACHERS)}")

    @property
    def e(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def shards_optimizer(self) -> bool:
        return self.engine == "fsdp2" or (self.engine == "deepspeed" and self.zero_stage >= 1)

    @property
    def shards_grads(self) -> bool:
        return self.engine == "fsdp2" or (self.engine == "deepspeed" and self.zero_stage >= 2)

    @property
    def shards_params(self) -> bool:
        return self.engine == "fsdp2" or (self.engine == "deepspeed" and self.zero_stage == 3)

    @property
    def frozen_gathered_layers(self) -> int:
        """Decoder layers whose frozen tensors are gathered at once (``shard_frozen``)."""
        return FROZEN_GATHERED_LAYERS[self.frozen_prefetch]


def phi_bytes(downcast: str, bits: int) -> float:
    """Bytes per weight of the stored Phi0."""
    key = downcast.lower()
    table = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fixed": 1.0, "int": 1.0}
    if key in table:
        return table[key]
    if key == "int-packed":
        if bits > 4:
            raise ValueError(f"downcast: 'int-packed' holds 2- to 4-bit codes, got bits={bits}")
        return 0.25 if bits <= 2 else 0.5
    if key.startswith("q") and "." in key:
        return 1.0
    raise ValueError(f"downcast: unknown {downcast!r}; expected fp32, bf16, fp16, fixed, q<i>.<f>, int, int-packed")


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Per-device bytes of each part and of each moment of a step; ``peak`` is the largest moment."""

    shape: ModelShape
    config: PlanConfig
    frozen: float  # frozen weights and buffers (device share)
    trainable: float  # fp32 trainable parameters (device share)
    gradients: float  # gradients held at the end of backward (device share)
    optimizer: float  # AdamW state (device share; 0 when offloaded)
    engine_buffers: float  # ZeRO buckets / fp32 partitions
    activations: float  # saved by autograd for the whole micro-batch (layer inputs only with checkpointing)
    layer_activations: float  # one decoder layer's saved activations
    loss: float  # the vocabulary cross-entropy's fp32 tensors
    temporaries: float  # largest weight rebuild (backward) + activation gradients of one layer
    gather: float  # ZeRO-3 / FSDP2 unsharded parameters in flight
    frozen_gather: float = 0.0  # shard_frozen: gathered frozen per-layer tensors + staging in flight
    moments: dict[str, float] = field(default_factory=dict)
    host_optimizer: float = 0.0  # offloaded optimizer state + fp32 partition (host memory)
    counts: dict[str, float] = field(default_factory=dict)

    @property
    def static(self) -> float:
        return self.frozen + self.trainable + self.optimizer + self.engine_buffers

    @property
    def peak(self) -> float:
        return max(self.moments.values())

    @property
    def peak_moment(self) -> str:
        return max(self.moments, key=self.moments.get)

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("shape", "config")}
        d.update(shape=asdict(self.shape), config=asdict(self.config), peak=self.peak, peak_moment=self.peak_moment)
        return d

    def table(self, unit: float = GiB) -> str:
        u = "GiB" if unit == GiB else "MiB" if unit == 2**20 else "GB" if unit == 1e9 else f"x{unit:g} B"
        c = self.config
        rows = [
            ("frozen weights + buffers", self.frozen),
            ("trainable (fp32)", self.trainable),
            ("gradients", self.gradients),
            ("optimizer (AdamW)", self.optimizer),
            ("engine buffers", self.engine_buffers),
            ("activations (saved)", self.activations),
            ("  of which one layer", self.layer_activations),
            ("loss (fp32 logits)", self.loss),
            ("temporaries", self.temporaries),
            ("gathered params", self.gather),
        ]
        if c.shard_frozen:
            rows.append(("gathered frozen layers", self.frozen_gather))
        head = (f"{self.shape.name}: {c.method}"
                + (f" phi={c.downcast}" if c.method == "lrqat" else "")
                + (f" r={c.rank}" if c.method in ("lrqat", LORA) else "")
                + f" W{c.bits}{'pc' if c.group_size is None else f'g{c.group_size}'}"
                + f" {c.micro_batch}x{c.seq_len} {c.dtype} engine={c.engine}"
                + (f" zero={c.zero_stage}" if c.engine == "deepspeed" else "")
                + (f" world={c.world_size}" if c.engine != "none" else "")
                + (" shard_frozen" + ("" if c.frozen_prefetch else "(no prefetch)") if c.shard_frozen else "")
                + (" ckpt" if c.activation_checkpointing else "") + (" offload" if c.offload_optimizer else ""))
        lines = [head]
        lines += [f"  {name:<26s}{v / unit:10.2f} {u}" for name, v in rows]
        for name, v in self.moments.items():
            mark = "  <- peak" if name == self.peak_moment else ""
            lines.append(f"  at {name:<23s}{v / unit:10.2f} {u}{mark}")
        if self.host_optimizer:
            lines.append(f"  host (offloaded optimizer){self.host_optimizer / unit:9.2f} {u}")
        return "\n".join(lines)


def _trainable_elems(cfg: PlanConfig, o: int, i: int) -> int:
    """Trainable values of one ``[o, i]`` linear."""
    g = 1 if cfg.group_size is None else i // cfg.group_size
    scale = o * g if cfg.train_scale else 0
    return {"lrqat": cfg.rank * (i + o) + scale, "peqa": o * g, "full_qat": o * i + scale,
            LORA: cfg.rank * (i + o), "rtn": 0}[cfg.method]


def _per_linear(shape: ModelShape, cfg: PlanConfig) -> tuple[float, float, float]:
    """(frozen bytes, trainable elements, largest trainable tensor elements) over all quantized linears."""
    frozen, trainable, largest = 0.0, 0.0, 0.0
    for _, o, i in shape.linears():
        g = 1 if cfg.group_size is None else i // cfg.group_size
        zp = 0 if cfg.symmetric else 4 * o * g
        if cfg.method == "lrqat":
            frozen += phi_bytes(cfg.downcast, cfg.bits) * o * i + 4 * o * g + zp
            t = cfg.rank * (i + o) + (o * g if cfg.train_scale else 0)
            frozen += 0 if cfg.train_scale else cfg.e * o * g
            largest = max(largest, cfg.rank * max(i, o))
        elif cfg.method in ("peqa", "rtn"):
            frozen += 2 * o * i + zp + (cfg.e * o * g if cfg.method == "rtn" else 0)
            t = o * g if cfg.method == "peqa" else 0
            largest = max(largest, o * g)
        elif cfg.method == "full_qat":
            frozen += zp + (0 if cfg.train_scale else cfg.e * o * g)
            t = o * i + (o * g if cfg.train_scale else 0)
            largest = max(largest, o * i)
        else:  # lora: frozen base weight in the compute dtype
            frozen += cfg.e * o * i
            t = cfg.rank * (i + o)
            largest = max(largest, cfg.rank * max(i, o))
        trainable += t
    return frozen * shape.layers, trainable * shape.layers, largest


def layer_activation_bytes(shape: ModelShape, cfg: PlanConfig, tokens: int) -> float:
    """Bytes autograd saves in one decoder layer for ``tokens`` tokens (see the module docstring)."""
    e, h, i = cfg.e, shape.hidden, shape.intermediate
    per_token = 2 * 4 * h + e * (2 * h + 2 * shape.q_dim + 2 * shape.kv_dim + 4 * i) + 4 * shape.heads + 2 * 4
    if cfg.method == LORA:
        per_token += e * cfg.rank * len(TARGETS)  # x @ A^T (compute dtype) saved for B's gradient
    return per_token * tokens


def shared_activation_bytes(shape: ModelShape, cfg: PlanConfig) -> float:
    """Bytes autograd saves once per forward, whatever the micro-batch (no decoder-layer checkpointing).

    * RoPE ``cos`` / ``sin`` (``[1, T, hd]`` each, compute dtype): HF LLaMA computes them once in
      ``LlamaModel.forward`` from ``position_ids`` ``[1, T]`` (our engines pass none, so the batch
      shares them) and every layer's ``apply_rotary_pos_emb`` saves the same two tensors.
    * LoRA with a 16-bit compute dtype: the compute-dtype copies of the fp32 A and B that ``x @ A^T``
      and ``(x A^T) @ B^T`` save for the input gradients (``e*r*(in+out)`` per linear), except A of
      the first layer's q, k, v, whose input (the frozen embedding) needs no gradient. In fp32 the
      cast is a no-op and the parameter itself is saved (counted as trainable).
    """
    rope = 2.0 * cfg.e * cfg.seq_len * shape.hd
    casts = 0.0
    if cfg.method == LORA and cfg.e != 4:
        casts = cfg.e * cfg.rank * (shape.layers * sum(o + i for _, o, i in shape.linears()) - 3 * shape.hidden)
    return rope + casts


def distill_terms(shape: ModelShape, cfg: PlanConfig, tokens: int) -> dict[str, float]:
    """Bytes of distillation (see the module docstring): ``teacher_weights`` (external teacher only),
    ``teacher_logits`` (held through the student's forward and the loss), ``loss`` (replaces the
    cross-entropy's), ``teacher_forward`` (one no-grad layer of the teacher plus its logits)."""
    e, V = cfg.e, shape.vocab
    chunk = min(cfg.distill_chunk, max(1, cfg.seq_len - 1)) if tokens else 0
    chunk_temps = (KD_CHUNK_TEMPS + (2 if e != 4 else 0)) * 4.0 * chunk * V
    big = max(o * i for _, o, i in shape.linears())
    logits = float(e * tokens * V)
    return {"teacher_weights": float(e * shape.total_params) if cfg.distill == "external" else 0.0,
            "teacher_logits": logits, "loss": 2 * logits + chunk_temps,
            "teacher_forward": logits + e * tokens * (shape.hidden + 2 * shape.intermediate)
            + (4.0 * big if cfg.distill == "phi0" else 0.0)}


def plan(shape: ModelShape, cfg: PlanConfig) -> Plan:
    """Predicted per-device memory of one steady-state training step (see the module docstring)."""
    e, w, L = cfg.e, cfg.world_size, shape.layers
    tokens = cfg.micro_batch * cfg.seq_len
    lin_frozen, n_train, largest_train = _per_linear(shape, cfg)
    float_frozen = e * (shape.embedding_params + shape.norm_params)  # frozen nn.Parameters (shardable)
    rotary = 4.0 * shape.hd  # inv_freq + original_inv_freq, fp32 [hd/2] each (replicated buffers)
    param_share = 1.0 / w if cfg.shards_params else 1.0
    # LoRA's base weight is a Parameter (sharded with the others); the methods' frozen per-layer tensors
    # are buffers, replicated unless dist.shard_frozen shards them (and gathers them per layer)
    lin_share = param_share if (cfg.method == LORA or cfg.shard_frozen) else 1.0
    frozen = lin_frozen * lin_share + float_frozen * param_share + rotary
    trainable = 4.0 * n_train * param_share
    training = cfg.method != "rtn" and n_train > 0

    # gradients and optimizer state
    grad_share = 1.0 / w if cfg.shards_grads else 1.0
    grads = 4.0 * n_train * grad_share if training else 0.0
    opt_full = 8.0 * n_train if training else 0.0
    opt_share = 1.0 / w if cfg.shards_optimizer else 1.0
    host_opt = 0.0
    engine = 0.0
    if cfg.engine == "deepspeed" and training:
        stage = cfg.zero_stage
        overlap = cfg.overlap_comm if cfg.overlap_comm is not None else stage == 3
        if stage == 0:
            engine += 4.0 * min(n_train, cfg.reduce_bucket)  # all-reduce bucket (flattened gradients)
        else:
            # contiguous gradient bucket, allocated at full size (two with overlap_comm in stages 1-2)
            engine += 4.0 * cfg.reduce_bucket * (2 if overlap and stage < 3 else 1)
            # stages 1-2 copy their fp32 parameter partition (the optimizer's masters); stage 3 reuses fp32
            # parameters and keeps a flat gradient partition, counted in ``grads``
            master = 4.0 * n_train / w if stage in (1, 2) else 0.0
            if cfg.offload_optimizer:
                host_opt = opt_full / w + master + (4.0 * n_train / w if stage >= 2 else 0.0)
                master = 0.0
                if stage >= 2:
                    grads = 0.0  # the gradient partition lives on the host too
            engine += master
    optimizer = 0.0 if (cfg.offload_optimizer and cfg.engine == "deepspeed") else opt_full * opt_share
    if cfg.offload_optimizer and cfg.engine != "deepspeed" and training:
        host_opt, optimizer = opt_full * opt_share, 0.0  # (planning only: our engines offload via DeepSpeed)

    # activations
    layer_act = layer_activation_bytes(shape, cfg, tokens) if training else 0.0
    shared = shared_activation_bytes(shape, cfg) if training and tokens else 0.0
    if cfg.activation_checkpointing and training:
        rope = 2.0 * e * cfg.seq_len * shape.hd
        saved = L * e * shape.hidden * tokens + 4 * shape.hidden * tokens + rope  # layer inputs + final norm input
        rebuilt = layer_act + (shared - rope) / L  # one layer rebuilt at a time (its LoRA casts too)
    else:
        saved = L * layer_act + shared
        rebuilt = 0.0
    loss = float(LOSS_BYTES_PER_LOGIT * tokens * shape.vocab)
    if not training:  # rtn: an evaluation forward (no graph): one layer's tensors + the fp32 logits
        loss = float((e + 4) * tokens * shape.vocab)
    kd = distill_terms(shape, cfg, tokens) if cfg.distill and training else None
    if kd is not None:
        frozen += kd["teacher_weights"]
        loss = kd["loss"] + kd["teacher_logits"]

    # temporaries of the weight rebuild (largest linear) and the activation gradients of one layer
    big = max(o * i for _, o, i in shape.linears())
    t_fwd, t_bwd = (TEMPORARIES if cfg.backward == "fast" else TEMPORARIES_AUTOGRAD)[cfg.method]
    if cfg.method == "lrqat" and cfg.backward == "fast" and big <= G_WHOLE_ELEMS:
        t_bwd += 1.0  # small layers form G whole, not in quarter blocks (methods/fast_backward.py; measured)
    if e == 2 and cfg.method not in (LORA, "rtn"):
        t_bwd += 0.5
    # activation gradients alive while the largest linear's weight is rebuilt in backward: the
    # layer's output gradient and the linear's input gradient
    act_grads = e * tokens * (shape.intermediate + shape.hidden) if training else 0.0
    temp_fwd = 4.0 * t_fwd * big + (e * tokens * (shape.hidden + 2 * shape.intermediate) if not training else 0.0)
    temp_bwd = 4.0 * t_bwd * big + act_grads
    # Within one layer's backward (order down, up, gate, o, v, k, q) the j-th linear rebuilds its weight
    # while the gradients of the linears before it (and its own) already exist.
    grad_unit = (4.0 * (grad_share if not (cfg.offload_optimizer and cfg.engine == "deepspeed" and cfg.zero_stage >= 2)
                        else 0.0)) if training else 0.0
    in_layer, cum = 0.0, 0.0
    for _, o, i in reversed(shape.linears()):
        cum += grad_unit * _trainable_elems(cfg, o, i)
        in_layer = max(in_layer, 4.0 * t_bwd * o * i + cum)
    grad_layer_total = cum

    # ZeRO-3 / FSDP2 gathers
    gather = 0.0
    if cfg.shards_params:
        layer_floats = 2 * e * shape.hidden + 4.0 * n_train / L + (lin_frozen / L if cfg.method == LORA else 0)
        emb = e * shape.vocab * shape.hidden
        if cfg.engine == "fsdp2":  # root unit (embeddings, lm_head, final norm) + current and prefetched layer
            gather = e * shape.embedding_params + 2 * layer_floats
        else:  # ZeRO-3: one module at a time (+ a prefetched one)
            biggest_module = max(emb, 4.0 * largest_train)
            gather = biggest_module + min(float(50_000_000 * e), layer_floats)
        gather -= (e * shape.embedding_params + layer_floats) / w  # their shards are already counted

    # shard_frozen: the gathered frozen tensors of the current (and prefetched) layer, full size, beside
    # the rank's own shards (+ any staging); LoRA's base weight is already in ``gather`` (a Parameter)
    frozen_gather = 0.0
    if cfg.shard_frozen and cfg.method != LORA:
        frozen_gather = (cfg.frozen_gathered_layers + FROZEN_GATHER_STAGING) * lin_frozen / L
    gather += frozen_gather

    static = frozen + trainable + optimizer + engine
    moments = {}
    if training:
        moments["forward (largest layer)"] = static + saved + temp_fwd + gather
        # At the loss no frozen layer is gathered (the last one is freed after its forward, nothing is
        # left to prefetch); at the end of backward only the first layer is (nothing below it to prefetch).
        moments["loss"] = static + saved + loss + gather - frozen_gather
        moments["backward (last layer)"] = static + saved + rebuilt + in_layer + act_grads + gather
        moments["backward (end)"] = (static + grads - grad_layer_total + in_layer + act_grads + gather
                                     - frozen_gather * (1 - 1 / cfg.frozen_gathered_layers)
                                     + (rebuilt if cfg.activation_checkpointing else layer_act))
        opt_temp = 0.0 if optimizer == 0 else 2 * 4.0 * largest_train * (opt_share if cfg.shards_optimizer else 1)
        moments["optimizer step"] = static + grads + opt_temp
        if kd is not None:
            moments["forward (largest layer)"] += kd["teacher_logits"]
            moments["teacher forward"] = static + gather + kd["teacher_forward"]
    else:
        moments["forward"] = static + temp_fwd + loss + gather
    counts = {"linear_params": shape.linear_params, "trainable_params": n_train, "tokens": tokens,
              "layer_activation_bytes_per_token": layer_act / tokens if tokens and training else 0.0}
    return Plan(shape=shape, config=cfg, frozen=frozen, trainable=trainable, gradients=grads, optimizer=optimizer,
                engine_buffers=engine, activations=saved, layer_activations=layer_act, loss=loss,
                temporaries=temp_bwd if training else temp_fwd, gather=max(gather - frozen_gather, 0.0),
                frozen_gather=frozen_gather, moments=moments,
                host_optimizer=host_opt, counts=counts)


def max_micro_batch(shape: ModelShape, cfg: PlanConfig, budget: float, reserve: float = 1.0 * GiB,
                    limit: int = 1 << 16) -> int:
    """The largest micro-batch whose predicted peak + ``reserve`` fits ``budget`` bytes (0 if none)."""
    def fits(b: int) -> bool:
        return plan(shape, replace(cfg, micro_batch=b)).peak + reserve <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
