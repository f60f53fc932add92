"""The loss math: next-token cross-entropy and the chunked distillation loss.

:func:`distill_loss` computes ``(1 - w) * CE + w * T^2 * D(teacher_T, student_T)`` (``D`` a KL divergence
between the temperature-softened distributions, averaged over the predicted tokens) together with its
gradient w.r.t. the student's logits, chunk by chunk over the tokens, in fp32: the fp32 vocab-sized
temporaries of teacher and student exist for one chunk at a time, never for the whole sequence. The
gradient is kept in the logits' dtype (one logits-sized tensor, what autograd would keep anyway) and
scaled by the incoming gradient in backward.

Per token, with ``s`` the student's and ``t`` the teacher's logits, ``q = softmax(s/T)``,
``p = softmax(t/T)``:

- forward KL ``KL(p || q) = sum p (log p - log q)``, ``d/ds = (q - p) / T``;
- reverse KL ``KL(q || p) = sum q (log q - log p)``, ``d/ds = q (log q - log p - KL(q || p)) / T``;
- CE ``-log softmax(s)[y]``, ``d/ds = softmax(s) - onehot(y)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Causal LM cross-entropy of predicting ``input_ids[:, 1:]`` from ``logits[:, :-1]`` (in fp32).

    Packed blocks have no padding, so every micro-batch holds the same number of targets and the mean
    of per-micro-batch means is the mean over the global batch.
    """
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction=reduction)


def token_chunks(batch: int, length: int, chunk: int) -> list[tuple[int, slice]]:
    """``(row, positions)`` pieces of the ``[batch, length - 1]`` predicting positions, ``chunk`` tokens at most."""
    return [(b, slice(t, min(t + chunk, length - 1))) for b in range(batch) for t in range(0, length - 1, chunk)]


def _chunk_loss_and_grad(s: torch.Tensor, t: torch.Tensor | None, targets: torch.Tensor, weight: float,
                         temperature: float, divergence: str, need_grad: bool
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed mixed loss of one chunk (``s``, ``t``: ``[c, V]`` logits; ``targets``: ``[c]``) and its
    gradient w.r.t. ``s`` (fp32, not yet divided by the token count)."""
    s = s.float()
    total = s.new_zeros(())
    grad = None
    if weight < 1.0:
        logp = torch.log_softmax(s, -1)
        total = total - (1.0 - weight) * logp.gather(1, targets[:, None]).sum()
        if need_grad:
            grad = logp.exp_()  # softmax(s), in logp's storage
            grad[torch.arange(grad.shape[0], device=grad.device), targets] -= 1.0
            grad.mul_(1.0 - weight)
        del logp
    if weight > 0.0:
        T = temperature
        logq = torch.log_softmax(s / T if T != 1.0 else s, -1)  # student, softened
        logp_t = torch.log_softmax(t.float() / T if T != 1.0 else t.float(), -1)  # teacher, softened (never in place)
        if divergence == "forward_kl":
            p_t = logp_t.exp()
            kl = (p_t * (logp_t - logq)).sum(-1)
            g = logq.exp_().sub_(p_t) if need_grad else None  # (q - p)
        else:  # reverse_kl
            q = logq.exp()
            ratio = logq.sub_(logp_t)  # log q - log p, in logq's storage
            kl = (q * ratio).sum(-1)
            g = q.mul_(ratio.sub_(kl[:, None])) if need_grad else None
        total = total + weight * T * T * kl.sum()
        if need_grad:
            g.mul_(weight * T)  # T^2 * (1/T)
            grad = g if grad is None else grad.add_(g)
    return total, grad


class _DistillLoss(torch.autograd.Function):
    """Mixed CE + KD loss of ``student`` logits ``[B, L, V]`` (with grad) against ``teacher`` logits (no grad)."""

    @staticmethod
    def forward(ctx, student, teacher, input_ids, weight, temperature, divergence, chunk):
        need_grad = ctx.needs_input_grad[0]
        B, L, V = student.shape
        n = B * (L - 1)
        grad = torch.zeros_like(student) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        with torch.no_grad():
            for b, pos in token_chunks(B, L, chunk):
                targets = input_ids[b, pos.start + 1:pos.stop + 1]
                t = None if teacher is None else teacher[b, pos]
                loss, g = _chunk_loss_and_grad(student[b, pos], t, targets, weight, temperature, divergence,
                                               need_grad)
                total += loss
                if need_grad:
                    grad[b, pos] = g.div_(n)
        ctx.grad, ctx.chunk = grad, chunk
        return total / n

    @staticmethod
    def backward(ctx, grad_output):
        grad, ctx.grad = ctx.grad, None
        # Scale in fp32, chunk by chunk; always (x * 1.0 is exact), so no host sync to test grad_output.
        go = grad_output.float()
        for b, pos in token_chunks(grad.shape[0], grad.shape[1], ctx.chunk):
            grad[b, pos] = grad[b, pos].float().mul_(go)
        return grad, None, None, None, None, None, None


def distill_loss(student: torch.Tensor, teacher: torch.Tensor | None, input_ids: torch.Tensor, weight: float,
                 temperature: float = 1.0, divergence: str = "forward_kl", chunk_tokens: int = 1024) -> torch.Tensor:
    """``(1 - weight) * CE + weight * T^2 * D`` averaged over the ``B * (L - 1)`` predicted tokens (fp32 scalar).

    student:  ``[B, L, V]`` logits (compute dtype, with grad); teacher: the same shape, no grad (None
    only with ``weight == 0``); input_ids ``[B, L]`` (targets ``input_ids[:, 1:]``). ``divergence``:
    ``forward_kl`` (KL(teacher || student)) or ``reverse_kl``. The gradient w.r.t. ``student`` is
    computed in forward, ``chunk_tokens`` tokens at a time, and stored in the logits' dtype.
    """
    if teacher is None and weight > 0:
        raise ValueError("distill_loss: weight > 0 needs teacher logits")
    if teacher is not None and teacher.shape != student.shape:
        raise ValueError(f"distill_loss: teacher logits {tuple(teacher.shape)} and student logits "
                         f"{tuple(student.shape)} differ (same tokenizer / vocabulary?)")
    if divergence not in ("forward_kl", "reverse_kl"):
        raise ValueError(f"distill_loss: unknown divergence {divergence!r}")
    if student.shape[1] < 2:
        raise ValueError("distill_loss: sequences of at least 2 tokens (nothing to predict)")
    teacher = None if teacher is None else teacher.detach()
    return _DistillLoss.apply(student, teacher, input_ids, float(weight), float(temperature), divergence,
                              int(chunk_tokens))
