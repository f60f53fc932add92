"""Knowledge distillation (train.distill): the phi0 teacher, the chunked KD loss, refusals, resume exactness."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from safetensors.torch import load_file

import lrqat_dist
from lrqat_dist import QATConfig
from lrqat_dist.methods.base import QuantLinear
from lrqat_dist.model.activations import activation_quantizers
from lrqat_dist.objective import DistillConfig, build_objective, distill_loss, next_token_loss, teacher_mode
from lrqat_dist.train import train
from lrqat_dist.train.config import config_from_dict
from train_common import job_dict, series, synthetic_builders


def _prepared(seed=0, **quant):
    model = lrqat_dist.load_causal_lm(config=tiny_config(), seed=seed)
    cfg = dict(rank=4, group_size=32, range_init="minmax", init="lora")
    cfg.update(quant)
    return lrqat_dist.prepare(model, QATConfig(**cfg)), cfg


def _plain_with_teacher_weights(student, seed=0):
    """A plain (unquantized) HF model of the same config whose target linears hold ``teacher_weight()``."""
    plain = lrqat_dist.load_causal_lm(config=tiny_config(), seed=seed)
    with torch.no_grad():
        for name, layer in student.named_modules():
            if isinstance(layer, QuantLinear):
                plain.get_submodule(name).weight.copy_(layer.teacher_weight())
    return plain.eval()


@pytest.mark.parametrize("quant", [
    {"method": "lrqat", "downcast": "fixed", "activations": "a8kv4"},  # Q4.4: W0 on an 8-bit grid
    {"method": "lrqat", "downcast": "bf16", "symmetric": False, "activations": "a4kv4"},
    {"method": "dlqat", "dlqat_phase1_steps": 0},
])
def test_phi0_teacher_logits_equal_a_plain_model_holding_the_teacher_weights(quant):
    """fp32: the teacher-mode forward is a plain HF forward with s0 * (decode(Phi0) - z0) as weights, activation
    quantizers bypassed. Same ops in the same order, so we assert equality to 1e-6 (measured: bit-equal)."""
    student, _ = _prepared(**quant)
    with torch.no_grad():
        for p in student.parameters():  # a student that moved away from W0: the teacher must not follow it
            if p.requires_grad and p.ndim == 2:
                p.add_(0.05 * torch.randn_like(p))
    if quant.get("activations"):
        assert activation_quantizers(student)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    student.train()
    with torch.no_grad(), teacher_mode(student):
        assert not student.training
        got = student(input_ids=ids).logits
    assert student.training and not any(getattr(m, "teacher_active", False) for m in student.modules())
    ref = _plain_with_teacher_weights(student)(input_ids=ids).logits
    assert (got - ref).abs().max().item() <= 1e-6
    with torch.no_grad():
        quantized = student(input_ids=ids).logits  # teacher mode left: the student again
    assert (quantized - ref).abs().max().item() > 1e-3
    if quant["method"] == "lrqat":  # the teacher weight is W0 on the downcast's grid
        w0 = lrqat_dist.load_causal_lm(config=tiny_config(), seed=0).model.layers[0].self_attn.q_proj.weight
        layer = student.model.layers[0].self_attn.q_proj
        err = (layer.teacher_weight() - w0).abs().max().item()
        # Q4.4 rounds to 1/16 of a code; bf16 keeps 8 significant bits of codes up to 16: <= 1/32 of a code
        step = layer.s0.max().item() / 16
        assert 0 < err <= step, (err, step)


def _direct_loss(s, t, ids, weight, T, divergence):
    """The mixed loss straight from torch (F.cross_entropy, F.kl_div on log_softmax), in fp32."""
    s, t = s[:, :-1].float().reshape(-1, s.shape[-1]), t[:, :-1].float().reshape(-1, t.shape[-1])
    ce = F.cross_entropy(s, ids[:, 1:].reshape(-1))
    logq, logp = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    if divergence == "forward_kl":  # KL(p || q): kl_div(input=log q, target=log p)
        kl = F.kl_div(logq, logp, reduction="batchmean", log_target=True)
    else:
        kl = F.kl_div(logp, logq, reduction="batchmean", log_target=True)
    return (1 - weight) * ce + weight * T * T * kl


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("weight,T", [(1.0, 1.0), (0.5, 2.0), (0.25, 0.5), (0.0, 1.0)])
def test_kd_loss_and_gradient_match_direct_torch(divergence, weight, T):
    g = torch.Generator().manual_seed(1)
    s = (3 * torch.randn(3, 9, 50, generator=g, dtype=torch.float64)).float().requires_grad_()
    t = 3 * torch.randn(3, 9, 50, generator=g)
    ids = torch.randint(0, 50, (3, 9), generator=g)
    got = distill_loss(s, t, ids, weight, T, divergence, chunk_tokens=4)
    (gs,) = torch.autograd.grad(got * 0.3, s)  # a grad_output != 1 (gradient accumulation)
    s2 = s.detach().clone().requires_grad_()
    ref = _direct_loss(s2, t, ids, weight, T, divergence)
    (rs,) = torch.autograd.grad(ref * 0.3, s2)
    assert abs(got.item() - ref.item()) <= 1e-6 * max(1.0, abs(ref.item()))
    assert (gs - rs).abs().max().item() <= 1e-7
    assert gs[:, -1].abs().max().item() == 0  # the last position predicts nothing
    if weight == 0.0:  # pure CE equals the plain CE objective
        assert abs(got.item() - next_token_loss(s, ids).item()) <= 1e-6


def test_chunked_equals_unchunked_also_in_bf16():
    g = torch.Generator().manual_seed(2)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 0.0)):
        s = torch.randn(2, 33, 300, generator=g).to(dtype).requires_grad_()
        t = torch.randn(2, 33, 300, generator=g).to(dtype)
        ids = torch.randint(0, 300, (2, 33), generator=g)
        out = []
        for chunk in (1, 7, 10_000):
            x = s.detach().clone().requires_grad_()
            loss = distill_loss(x, t, ids, 0.5, 2.0, "forward_kl", chunk_tokens=chunk)
            loss.backward()
            assert x.grad.dtype == dtype
            out.append((loss.item(), x.grad.float()))
        for loss, grad in out[:-1]:
            assert abs(loss - out[-1][0]) <= 1e-6 * abs(out[-1][0])
            # per-token gradients do not depend on the chunking at all (only the loss's summation order)
            assert (grad - out[-1][1]).abs().max().item() <= tol


def test_distill_config_validation_names_the_key(tmp_path):
    base = job_dict(tmp_path)
    for bad, msg in [({"weight": 1.5}, "train.distill.weight"), ({"temperature": 0}, "train.distill.temperature"),
                     ({"divergence": "js"}, "train.distill.divergence"), ({"chunk": 3}, "train.distill.chunk"),
                     ({"teacher": ""}, "train.distill.teacher")]:
        d = job_dict(tmp_path, train={"distill": bad})
        with pytest.raises(ValueError, match=msg):
            config_from_dict(d)
    assert not config_from_dict(base).train.distill.enabled
    cfg = config_from_dict(job_dict(tmp_path, train={"distill": {"teacher": "phi0", "weight": 0.7}}))
    assert cfg.train.distill == DistillConfig("phi0", 0.7) and not cfg.train.distill.external


@pytest.mark.parametrize("quant,word", [({"method": "lrqat", "downcast": "int"}, "lrqat"),
                                        ({"method": "lrqat", "downcast": "int-packed"}, "teaches nothing new"),
                                        ({"method": "rtn"}, "'rtn'"), ({"method": "peqa"}, "'peqa'"),
                                        ({"method": "full_qat"}, "'full_qat'"), ({"method": "loqt"}, "'loqt'")])
def test_phi0_teacher_is_refused_where_the_method_has_none(quant, word):
    model, cfg = _prepared(**quant)
    with pytest.raises(ValueError, match=word) as e:
        build_objective(DistillConfig("phi0"), model, cfg["method"], torch.float32, torch.device("cpu"))
    assert "train.distill.teacher" in str(e.value) and "teacher: <a local HF model directory>" in str(e.value)


def test_external_teacher_is_the_loaded_model(tmp_path):
    """teacher: <HF dir>: the frozen model loaded by the project's loader supplies the teacher logits."""
    fp = lrqat_dist.load_causal_lm(config=tiny_config(), seed=3)
    fp.save_pretrained(tmp_path / "teacher")
    model, cfg = _prepared()
    obj = build_objective(DistillConfig(str(tmp_path / "teacher"), 0.5), model, "lrqat", torch.float32,
                          torch.device("cpu"))
    assert obj.teacher is not None and not any(p.requires_grad for p in obj.teacher.parameters())
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        ref = fp.eval()(input_ids=ids).logits
    assert torch.equal(obj.teacher_logits(model, lambda x: model(input_ids=x).logits, ids), ref)
    small = lrqat_dist.load_causal_lm(config=tiny_config(vocab_size=128))
    small.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="vocabulary of 128"):
        build_objective(DistillConfig(str(tmp_path / "other")), model, "lrqat", torch.float32, torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="train.distill.teacher"):
        build_objective(DistillConfig(str(tmp_path / "missing")), model, "lrqat", torch.float32, torch.device("cpu"))


KD = {"distill": {"teacher": "phi0", "weight": 0.5, "temperature": 2.0, "chunk_tokens": 40}}


def test_kd_resume_is_bit_identical(tmp_path):
    """One process, grad_accum 2, activation quantization on: preempted at step 2 and resumed, the KD run
    lands on the same bits as an uninterrupted one (the teacher is deterministic, no RNG)."""
    import os
    import signal

    def job(out):
        return config_from_dict(job_dict(out, train={"max_steps": 4, "grad_accum": 2, "save_every": 2, **KD},
                                         quant={"activations": "a8kv4"}))

    ref = train(job(tmp_path / "ref"), resume="none", builders=synthetic_builders())
    assert ref.step == 4

    def kill(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    first = train(job(tmp_path / "cut"), resume="none", builders=synthetic_builders(), on_step=kill)
    assert first.preempted and first.step == 2
    assert train(job(tmp_path / "cut"), resume="auto", builders=synthetic_builders()).step == 4
    assert series(tmp_path / "cut") == series(tmp_path / "ref")
    a = load_file(tmp_path / "ref/checkpoints/step_00000004/trainable.safetensors")
    b = load_file(tmp_path / "cut/checkpoints/step_00000004/trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The KD objective was what trained: its logged loss is the mixed one, not the plain CE (val_loss).
    val = series(tmp_path / "ref", "val_loss")[4]
    assert math.isfinite(val) and abs(series(tmp_path / "ref")[1] - val) > 1.0


def test_phi0_teacher_refuses_trained_unquantized_parameters_and_weight0_loads_no_teacher(tmp_path):
    """A phi0 teacher shares embeddings, norms and head with the student: if training moves them the
    teacher moves too, so it is refused; weight 0 is plain CE and builds no teacher at all."""
    model, _ = _prepared()
    model.get_input_embeddings().weight.requires_grad_(True)
    with pytest.raises(ValueError, match="outside the quantized linears frozen.*embed_tokens"):
        build_objective(DistillConfig(teacher="phi0"), model, "lrqat", torch.float32, torch.device("cpu"))
    off = build_objective(DistillConfig(teacher=str(tmp_path / "missing"), weight=0.0), model, "lrqat",
                          torch.float32, torch.device("cpu"))  # would raise FileNotFoundError if it loaded
    assert not off.distills and off.teacher is None
