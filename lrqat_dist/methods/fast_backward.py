"""Exact backward passes that never chain autograd through an ``[out, in]`` weight rebuild.

The plain path (:class:`lrqat_dist.methods.base._RecomputedLinear`, ``QATConfig.backward:
autograd``) forms ``G = grad_out^T x`` and differentiates the rebuilt weight through ~20 full-size
autograd nodes. The functions here compute the same gradients (up to fp32 summation order; see
tests/test_fast_backward.py) from the fused, no-autograd rebuild of the layer:

LR-QAT (``pre = Phi0 + c B A``, ``q = clip(round(pre))``, ``W_hat = s (q - z)``, STE with the
in-range mask ``M``): ``dL/dpre = G * S * M`` and ``M = 1 - C`` (``C`` clipped):

- the dense part is low-rank: per channel ``dB = c diag(s) g^T (x A^T)``, ``dA = c (B^T diag(s) g^T) x``;
  per group the same with ``x_g A_g^T`` per group: skinny matmuls only;
- the correction subtracts the same terms at clipped positions only, with ``G[o, i]`` gathered as
  ``g[:, o] . x[:, i]`` in chunks (a small fraction of the weight: REFERENCE.md section 7);
- ``dL/ds`` per channel is ``sum_t g[t, o] y0[t, o] / s[o]`` with ``y0 = x W_hat^T`` (``y`` without
  the bias, recomputed: keeping the forward output would add an activation per linear to the saved
  memory, which the planner and tests/test_memory_plan.py pin);
  per group it needs ``G`` group by group, formed in row chunks and then used for ``A`` and ``B``
  too (the dense form of the same gradient: no gather needed).

The gather is memory-bound: when it would cost more than forming G (a cost model with the measured
:data:`GATHER_COST`, :func:`_use_dense`) the chunked dense form is used instead; with a trained
per-channel scale that is already at a few hundredths of a percent clipped on this CPU, because the
dense form gets dL/ds from G for free. PEQA and full QAT need ``G`` anyway
(``dL/dW`` is full-rank); they get the chunked dense form without the autograd graph. So does DL-QAT
(per-group ``m``, ``s``, ``b``: sums of ``G`` per group), in both of its phases.
"""
from __future__ import annotations

import logging
import threading

import torch
import torch.nn.functional as F

from ..quant.affine import grouped

logger = logging.getLogger(__name__)

# The gathered correction reads two token-length rows per clipped weight: memory-bound. Measured on
# this project's CPU (bench_speed --clipping, SmolLM2 576x1536 at 1,024 tokens): 0.28% clipped cost
# 1.26x the G matmul, i.e. about GATHER_COST * fraction G-matmuls.
GATHER_COST = 450.0
DENSE_CLIPPED_FRACTION = None  # set (tests) to force: low-rank when the fraction is at most this, else dense
GATHER_CHUNK_ELEMS = 1 << 22  # elements of one [chunk, tokens] gather (16 MiB fp32)
G_CHUNK_ELEMS = 1 << 22  # elements of one [rows, in] block of G
# Layers up to this many weights form G whole (one matmul): at SmolLM2's 192x576 and 576x576 the four
# quarter blocks' extra calls made the fast path slower than autograd (docs/RESULTS.md, "Speed"); the
# extra memory, about one such layer (4 MiB, measured), is counted by the planner (memory/planner.py).
G_WHOLE_ELEMS = 1 << 20
SCRATCH_MIN_BYTES = 32 << 20  # glibc's largest mmap threshold: bigger blocks page-fault anew each time


class _Scratch:
    """Reused ``[out, in]``-sized buffers for the rebuild inside forward/backward, on CPU only.

    glibc serves every allocation above 32 MiB with a fresh mmap, so each rebuilt 7B-shaped weight
    (64-180 MB) page-faults on first touch; on this CPU that cost as much as the rebuild itself. One
    buffer per role, grown to the largest layer, is used only inside one layer's forward or backward
    (layers run one at a time). Only buffers of at least :data:`SCRATCH_MIN_BYTES` are kept (smaller
    ones glibc recycles itself); such a buffer stays allocated between steps, e.g. at the loss (CPU
    only; the planner models CUDA, whose caching allocator already reuses blocks), until
    :func:`release_scratch`.

    The buffers are per process and per thread (``threading.local``): two threads training two
    models each get their own, so they never overwrite each other's weight mid-layer; a thread's
    buffers are freed when it exits or calls :func:`release_scratch`."""

    def __init__(self):
        self._local = threading.local()

    @property
    def buffers(self) -> dict[tuple, torch.Tensor]:
        buffers = getattr(self._local, "buffers", None)
        if buffers is None:
            buffers = self._local.buffers = {}
        return buffers

    def release(self) -> None:
        self._local.buffers = {}

    def get(self, role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        if device.type != "cpu":
            return None
        n = 1
        for d in shape:
            n *= d
        if n * torch.empty((), dtype=dtype).element_size() < SCRATCH_MIN_BYTES:
            return None
        key, buffers = (role, dtype), self.buffers
        buf = buffers.get(key)
        if buf is None or buf.numel() < n:
            buffers[key] = buf = None  # drop the old one before allocating the larger one
            buf = buffers[key] = torch.empty(n, dtype=dtype)
        return buf[:n].view(shape)


SCRATCH = _Scratch()


def release_scratch() -> None:
    """Free the calling thread's reused rebuild buffers (e.g. after training, before evaluation or
    export in the same process); the next fast forward/backward allocates them again."""
    SCRATCH.release()


def _cast(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if w.dtype == dtype:
        return w
    out = SCRATCH.get("cast", tuple(w.shape), dtype, w.device)
    return w.to(dtype) if out is None else out.copy_(w)


def _g_row_chunks(out_features: int, in_features: int, elems: int = G_CHUNK_ELEMS) -> list[slice]:
    rows = max(1, elems // max(1, in_features))
    return [slice(r, min(r + rows, out_features)) for r in range(0, out_features, rows)]


def _expand(per_group: torch.Tensor, in_features: int) -> torch.Tensor:
    """``[rows, n_groups]`` -> ``[rows, in]`` (a broadcast view where possible)."""
    rows, ng = per_group.shape
    return per_group.unsqueeze(-1).expand(rows, ng, in_features // ng).reshape(rows, in_features)


def _grad_x(grad_out: torch.Tensor, w: torch.Tensor, x_shape) -> torch.Tensor:
    return (grad_out @ _cast(w, grad_out.dtype)).reshape(x_shape)


def _gram_block(g2: torch.Tensor, x2: torch.Tensor, rows: slice) -> torch.Tensor:
    """``G[rows] = g[:, rows]^T x`` in the compute dtype (as the plain path), then fp32."""
    return (g2[:, rows].t() @ x2).float()


def _linear_saving_input(ctx, x: torch.Tensor, module, w: torch.Tensor) -> torch.Tensor:
    """The fast Functions' forward: ``x W^T + b`` keeping only ``x`` (the weight is rebuilt in backward)."""
    ctx.module = module
    ctx.save_for_backward(x)
    return F.linear(x, _cast(w, x.dtype), module.cast_bias(x.dtype))


# --- LR-QAT ---------------------------------------------------------------------------------------

class _LowRankLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module, lora_a, lora_b, scale):
        w, _ = module.fused_rebuild(scratch=SCRATCH, compiled=module.compile_rebuild)
        return _linear_saving_input(ctx, x, module, w)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        m = ctx.module
        need_x, _, need_a, need_b, need_s = ctx.needs_input_grad
        w, clipped = m.fused_rebuild(with_mask=need_a or need_b, scratch=SCRATCH, compiled=m.compile_rebuild)
        grad_x = _grad_x(grad_out, w, x.shape) if need_x else None
        if not (need_a or need_b or need_s):
            return grad_x, None, None, None, None
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grads = lrqat_param_grads(m, g2, x2, w, clipped, need_a, need_b, need_s)
        return (grad_x, None, *grads)


def lrqat_param_grads(m, g2: torch.Tensor, x2: torch.Tensor, w: torch.Tensor, clipped: torch.Tensor | None,
                      need_a: bool, need_b: bool, need_s: bool):
    """(dA, dB, ds) of an LR-QAT layer from ``g2 = grad_out`` [T, out], ``x2`` [T, in], the rebuilt
    ``w`` and clipped mask; entries not needed are None."""
    c, s = m.scaling, m.scale.detach()
    a, b = m.lora_A.detach(), m.lora_B.detach()
    out_f, in_f = w.shape
    ng = s.shape[1]
    n_clipped = int(torch.count_nonzero(clipped)) if clipped is not None else 0  # .sum() would widen to int64
    if _use_dense(need_s, ng, n_clipped / w.numel(), g2.shape[0], a.shape[0], out_f, in_f):
        return _dense_lrqat(m, g2, x2, w, clipped, need_a, need_b, need_s)
    gf, xf = g2.float(), x2.float()
    da = db = ds = None
    if need_a or need_b:
        if ng == 1:
            gs = gf * s[:, 0]  # [T, out]
            if need_b:
                db = (gs.t() @ (xf @ a.t())).mul_(c)
            if need_a:
                da = ((gs @ b).t() @ xf).mul_(c)
        else:
            t, r, gsz = xf.shape[0], a.shape[0], in_f // ng
            xg = xf.reshape(t, ng, gsz).transpose(0, 1)  # [ng, T, gsz]
            if need_b:
                xa = torch.bmm(xg, a.reshape(r, ng, gsz).permute(1, 2, 0))  # [ng, T, r]
                p = (gf.t() @ xa.transpose(0, 1).reshape(t, ng * r)).reshape(out_f, ng, r)
                db = (p * s.unsqueeze(-1)).sum(1).mul_(c)
            if need_a:
                h = (b.t().unsqueeze(0) * s.t().unsqueeze(1)) @ gf.t()  # [ng, r, T]
                da = torch.bmm(h, xg).transpose(0, 1).reshape(r, in_f).mul_(c)
        if n_clipped:
            _subtract_clipped(gf, xf, s, a, b, c, clipped, da, db)
    if need_s:  # per channel here (per group went dense): sum_t g * (x (q - z)^T)
        ds = scale_grad_per_channel(g2, x2, w, s)
    return da, db, ds


def _use_dense(need_s: bool, n_groups: int, clipped_fraction: float, tokens: int, rank: int,
               out_features: int, in_features: int) -> bool:
    """Cost model in units of one ``T x out x in`` matmul. Dense: G itself (which also gives dL/ds)
    plus two ``[out, in] x [in, r]`` products (``2r/T``). Low-rank: four skinny ``T``-long products
    (``x A^T``, ``g^T (x A^T)``, ``g B``, ``(g B)^T x``: ``2r (1/out + 1/in)``), the gathered
    correction, plus the recomputed ``x W^T`` when the scale trains (per channel; per group it needs
    G anyway). The skinny term decides at small layers: at SmolLM2's 576x576 and 1,024 tokens it is
    0.22 of a matmul against the dense form's 0.06, and the low-rank form measured slower there."""
    if DENSE_CLIPPED_FRACTION is not None:
        return (need_s and n_groups > 1) or clipped_fraction > DENSE_CLIPPED_FRACTION
    if need_s and n_groups > 1:
        return True
    skinny = 2.0 * rank * (1.0 / max(1, out_features) + 1.0 / max(1, in_features))
    low_rank = (1.0 if need_s else 0.0) + skinny + GATHER_COST * clipped_fraction
    return low_rank > 1.0 + 2.0 * rank / max(1, tokens)


def _subtract_clipped(gf, xf, s, a, b, c, clipped, da, db) -> None:
    """Remove the dense part's contribution at clipped positions: G there is gathered, chunked."""
    idx = clipped.nonzero()
    o, i = idx[:, 0], idx[:, 1]
    g_t, x_t = gf.t().contiguous(), xf.t().contiguous()  # rows gathered contiguously
    gsz = clipped.shape[1] // s.shape[1]
    chunk = max(1, GATHER_CHUNK_ELEMS // max(1, g_t.shape[1]))
    for k in range(0, o.numel(), chunk):
        oc, ic = o[k:k + chunk], i[k:k + chunk]
        gv = (g_t.index_select(0, oc) * x_t.index_select(0, ic)).sum(1)  # index_select: 4x advanced indexing
        dv = gv.mul_(s[oc, ic // gsz]).mul_(-c)  # -c * s * G at each clipped weight
        if db is not None:
            db.index_add_(0, oc, dv.unsqueeze(1) * a.t()[ic])
        if da is not None:
            da.t().index_add_(0, ic, dv.unsqueeze(1) * b[oc])


def _dense_lrqat(m, g2, x2, w, clipped, need_a, need_b, need_s):
    """The same gradients from ``G`` formed in row chunks (never whole): dpre = G * S * M."""
    c, s = m.scaling, m.scale.detach()
    a, b = m.lora_A.detach(), m.lora_B.detach()
    out_f, in_f = w.shape
    da = torch.zeros_like(a) if need_a else None
    db = torch.empty_like(b) if need_b else None
    ds = torch.empty_like(s) if need_s else None
    # G blocks of at most a quarter of the layer, or G whole for small layers: the planner's LR-QAT
    # backward temporaries (memory/planner.py) count W_hat + mask + one such block
    for rows in _g_row_chunks(out_f, in_f, g_block_elems(out_f, in_f)):
        gblk = _gram_block(g2, x2, rows)
        if need_s:
            ds[rows] = _sum_g_times_codes(gblk, w[rows], s[rows])
        if need_a or need_b:
            dpre = gblk.mul_(_expand(s[rows], in_f))
            if clipped is not None:
                dpre.masked_fill_(clipped[rows], 0.0)
            if need_b:
                db[rows] = (dpre @ a.t()).mul_(c)
            if need_a:
                da.add_(b[rows].t() @ dpre, alpha=c)
    return da, db, ds


def g_block_elems(out_features: int, in_features: int) -> int:
    """Elements of one block of G in LR-QAT's dense form: the whole layer up to :data:`G_WHOLE_ELEMS`,
    else at most a quarter of it (and at most :data:`G_CHUNK_ELEMS`), at least one row."""
    n = out_features * in_features
    return n if n <= G_WHOLE_ELEMS else min(G_CHUNK_ELEMS, max(in_features, n // 4))


def lrqat_linear(x: torch.Tensor, module) -> torch.Tensor:
    return _LowRankLinear.apply(x, module, module.lora_A, module.lora_B, module.scale)


# --- PEQA and full QAT: G is needed (dL/dW full-rank, or per-group scales), formed in row chunks ---

class _DenseGradLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module, *params):
        with torch.no_grad():
            w = module.rebuilt_weight()
        return _linear_saving_input(ctx, x, module, w)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        m = ctx.module
        need = ctx.needs_input_grad[2:]
        with torch.no_grad():
            w = m.rebuilt_weight()
        grad_x = _grad_x(grad_out, w, x.shape) if ctx.needs_input_grad[0] else None
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        return (grad_x, None, *m.dense_param_grads(g2, x2, w, need))


def dense_linear(x: torch.Tensor, module) -> torch.Tensor:
    return _DenseGradLinear.apply(x, module, *module.trainable_tensors())


def scale_grad_per_channel(g2: torch.Tensor, x2: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``dL/ds`` of ``W = s (q - z)`` per channel without G: ``sum_t g[t, o] (x W^T)[t, o] / s[o]``."""
    y0 = F.linear(x2, _cast(w, x2.dtype)).float()  # no [out, in] temporary beyond w itself
    return ((g2.float() * y0).sum(0) / s[:, 0]).unsqueeze(1)


def scale_grad_per_group(g2: torch.Tensor, x2: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``dL/ds`` of ``W = s (q - z)`` per group: ``sum_{i in g} G (q - z)`` with G in row chunks."""
    ds = torch.empty_like(s)
    for rows in _g_row_chunks(*w.shape):
        ds[rows] = _sum_g_times_codes(_gram_block(g2, x2, rows), w[rows], s[rows])
    return ds


def _codes_minus_z(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``q - z`` recovered exactly from ``w = s (q - z)``: an integer, and ``w / s`` is within an ulp."""
    return torch.round(grouped(w, s.shape[1]) / s.unsqueeze(-1))


def _sum_g_times_codes(g: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``sum_{i in group} G (q - z)`` with one block-sized temporary (the codes, multiplied in place)."""
    codes = grouped(w, s.shape[1]) / s.unsqueeze(-1)
    return codes.round_().mul_(grouped(g, s.shape[1])).sum(-1)


def gram_row_chunks(g2: torch.Tensor, x2: torch.Tensor, out_features: int, in_features: int,
                    elems: int = G_CHUNK_ELEMS):
    """Yield ``(rows, G[rows])`` (fp32) for the methods whose gradient needs G itself (full QAT)."""
    for rows in _g_row_chunks(out_features, in_features, elems):
        yield rows, _gram_block(g2, x2, rows)


# --- DL-QAT: W_hat = (m s) q + m b, q = clip(round((W0 + c B@A - b) / s)); G in row chunks ------------
# G is needed in both phases (m, s, b are per group and dL/dm, dL/ds, dL/db are per-group sums over
# G; phase 2's dA, dB are the dense form, as LR-QAT's at per-group scales). About seven chunk-sized
# temporaries are alive at once (G, the grid positions, q, the mask and products).
DLQAT_CHUNK_ELEMS = 1 << 20


class _DLQATLinear(torch.autograd.Function):
    """DL-QAT's forward is its fused no-grad rebuild (:meth:`DLQATLinear.fused_rebuild`); backward
    honours :meth:`~lrqat_dist.methods.dlqat.DLQATLinear.gradient_mask` (the phase) as the plain
    path does: a masked tensor gets an exact zero gradient."""

    @staticmethod
    def forward(ctx, x, module, *params):
        w = module.fused_rebuild(scratch=SCRATCH)
        return _linear_saving_input(ctx, x, module, w)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        m = ctx.module
        wanted = ctx.needs_input_grad[2:]
        need = tuple(n and k for n, k in zip(wanted, m.gradient_mask()))
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        if any(need):
            w, grads = dlqat_param_grads(m, g2, x2, need)
        else:
            w, grads = m.fused_rebuild(scratch=SCRATCH), (None,) * len(need)
        grad_x = _grad_x(grad_out, w, x.shape) if ctx.needs_input_grad[0] else None
        grads = [torch.zeros_like(p) if g is None and n else g
                 for p, g, n in zip(m.trainable_tensors(), grads, wanted)]
        return (grad_x, None, *grads)


@torch.no_grad()
def dlqat_param_grads(m, g2: torch.Tensor, x2: torch.Tensor, need: tuple[bool, ...]):
    """``(W_hat, (ds, db, dm, dA, dB))`` of a DL-QAT layer (entries not in ``need`` are None) from
    ``g2 = grad_out`` [T, out] and ``x2`` [T, in]. ``W_hat`` is rebuilt row chunk by row chunk
    (:meth:`rebuild_rows_`, as :meth:`fused_rebuild`) into one ``[out, in]`` buffer (first ``B@A``,
    one matmul as in forward), bit for bit the forward's weight. With ``u = (W0 + c B@A - b) / s``,
    ``q = clip(round(u))``, ``M`` the in-range mask of ``round(u)`` (``torch.clamp``'s gradient
    rule: the ends included) and ``G = g^T x`` per chunk, the plain path's chain rule (STE, LSQ)
    reads, per group:

    - ``dm = s sum G q + b sum G`` (through ``m s`` and ``m b``);
    - ``ds = m (sum G q - sum G M u)``, ``db = m (sum G - sum G M)`` (``s`` cancels);
    - ``dA = c B^T (G m M)``, ``dB = c (G m M) A^T`` (``dL/d(W0 + c B@A) = G m s M / s``).
    """
    need_s, need_b, need_m, need_a, need_bb = need
    s, b, mag = m.scale.detach(), m.offset.detach(), m.magnitude.detach()
    a, bm = m.lora_A.detach(), m.lora_B.detach()
    ms, mb = m.scale_tensor().detach(), m.offset_tensor().detach()
    c, ng = m.scaling, s.shape[1]
    shape = (m.out_features, m.in_features)
    w = m.lowrank_product(SCRATCH)  # B@A, then W_hat row chunk by row chunk
    ds = torch.empty_like(s) if need_s else None
    db = torch.empty_like(b) if need_b else None
    dm = torch.empty_like(mag) if need_m else None
    da = torch.zeros_like(a) if need_a else None
    dbb = torch.empty_like(bm) if need_bb else None
    for rows in _g_row_chunks(*shape, DLQAT_CHUNK_ELEMS):
        u, q, inside = m.rebuild_rows_(w, rows, ms, mb)  # w[rows] = weight_hat()[rows], bit for bit
        gblk = _gram_block(g2, x2, rows)
        gg = grouped(gblk, ng)
        gq = (gg * grouped(q, ng)).sum(-1) if (need_m or need_s) else None
        gsum = gg.sum(-1) if (need_m or need_b) else None
        if need_m:
            dm[rows] = gq * s[rows] + gsum * b[rows]
        if need_s or need_b:
            gm = grouped(gblk * inside, ng)
            if need_s:
                ds[rows] = (gq - (gm * grouped(u, ng)).sum(-1)).mul_(mag[rows])
            if need_b:
                db[rows] = (gsum - gm.sum(-1)).mul_(mag[rows])
        if need_a or need_bb:
            dpre = gblk.mul_(_expand(mag[rows], shape[1])).mul_(inside)
            if need_bb:
                dbb[rows] = (dpre @ a.t()).mul_(c)
            if need_a:
                da.add_(bm[rows].t() @ dpre, alpha=c)
    return w, (ds, db, dm, da, dbb)


def dlqat_linear(x: torch.Tensor, module) -> torch.Tensor:
    return _DLQATLinear.apply(x, module, *module.trainable_tensors())
