"""Model patching on real HF model classes: prepare, fold, materialize, loading, config validation."""
import pytest
import torch
from conftest import tiny_config
from torch import nn

import lrqat_dist
from lrqat_dist import QATConfig
from lrqat_dist.methods import LRQATLinear, QuantLinear
from lrqat_dist.typed_config import from_dict


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_prepare_replaces_exactly_the_projections(family):
    model = lrqat_dist.load_causal_lm(config=tiny_config(family))
    lrqat_dist.prepare(model, QATConfig(rank=4, group_size=32, downcast="q4.4", range_init="minmax"))
    quant = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(quant) == 7 * 2
    assert all(isinstance(m, LRQATLinear) for m in model.modules() if isinstance(m, QuantLinear))
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, QuantLinear)
    trainable = {n.rpartition(".")[2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "scale"}
    assert not model.get_input_embeddings().weight.requires_grad
    assert all(not p.requires_grad for n, p in model.named_parameters() if "norm" in n)
    if family == "qwen2":  # q/k/v carry a bias: kept as a frozen buffer
        assert model.model.layers[0].self_attn.q_proj.bias is not None


@pytest.mark.parametrize("method,phi,sym", [("lrqat", "fixed", True), ("lrqat", "int-packed", False),
                                            ("lrqat", "bf16", False), ("peqa", "fixed", True),
                                            ("full_qat", "fixed", False)])
def test_logits_equal_a_plain_model_holding_the_folded_weights(method, phi, sym):
    model = lrqat_dist.load_causal_lm(config=tiny_config("qwen2"))
    lrqat_dist.prepare(model, QATConfig(method=method, bits=3, group_size=16, symmetric=sym, rank=4,
                                        downcast=phi, range_init="lp", lp_grid=20))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # stand-in for training: move every trainable tensor
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * (0.3 if n.endswith("lora_B") else 1e-4))
    ids = torch.randint(0, 256, (2, 24), generator=g)
    qat_logits = model(ids).logits
    folded = lrqat_dist.fold(model)
    assert set(folded) == {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}

    plain = lrqat_dist.load_causal_lm(config=tiny_config("qwen2"), seed=123)  # different init everywhere
    state = model.state_dict()
    sd = {k: v for k, v in state.items() if k in plain.state_dict()}  # embeddings, norms, lm_head
    for name, f in folded.items():
        sd[f"{name}.weight"] = f.dequantize()
        if f.bias is not None:
            sd[f"{name}.bias"] = f.bias
    missing, unexpected = plain.load_state_dict(sd, strict=False)
    assert not missing and not unexpected
    assert torch.equal(plain(ids).logits, qat_logits)
    assert torch.equal(lrqat_dist.materialize(model)(ids).logits, qat_logits)


def test_patching_errors_name_the_problem(tmp_path):
    model = lrqat_dist.load_causal_lm(config=tiny_config())
    with pytest.raises(ValueError, match=r"targets: no nn.Linear named \['qproj'\].*'q_proj'"):
        lrqat_dist.prepare(model, QATConfig(targets=["qproj"]))
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj: input dimension 64 is not divisible by group_size 48"):
        lrqat_dist.prepare(model, QATConfig(group_size=48, rank=4))
    fresh = lrqat_dist.load_causal_lm(config=tiny_config())
    lrqat_dist.prepare(fresh, QATConfig(rank=4, range_init="minmax"))
    with pytest.raises(ValueError, match="already prepared"):
        lrqat_dist.prepare(fresh, QATConfig(rank=4))
    with pytest.raises(ValueError, match="call lrqat_dist.prepare first"):
        lrqat_dist.fold(lrqat_dist.load_causal_lm(config=tiny_config()))


def test_qat_config_from_yaml_dict_names_bad_keys():
    cfg = from_dict(QATConfig, {"bits": 3, "group_size": 64, "alpha": 16, "targets": ["q_proj"]}, "quant")
    assert cfg.alpha == 16.0 and isinstance(cfg.alpha, float) and cfg.spec.n_groups(128) == 2
    with pytest.raises(ValueError, match=r"quant.rnak: unknown key"):
        from_dict(QATConfig, {"rnak": 8}, "quant")
    with pytest.raises(ValueError, match=r"quant.bits: expected int, got str"):
        from_dict(QATConfig, {"bits": "4"}, "quant")
    with pytest.raises(ValueError, match=r"quant.symmetric: expected bool"):
        from_dict(QATConfig, {"symmetric": 1}, "quant")
    with pytest.raises(ValueError, match=r"quant.method: unknown 'gptq'"):
        from_dict(QATConfig, {"method": "gptq"}, "quant")
    with pytest.raises(ValueError, match=r"quant.downcast: 'q4.4' cannot hold the 8-bit grid"):
        from_dict(QATConfig, {"bits": 8, "downcast": "q4.4"}, "quant")


def test_loading_from_a_local_directory_or_a_config(tmp_path):
    model = lrqat_dist.load_causal_lm(config=tiny_config("mistral"), seed=3)
    model.save_pretrained(tmp_path / "m")
    again = lrqat_dist.load_causal_lm(path=tmp_path / "m")
    ids = torch.arange(10)[None]
    assert torch.equal(again(ids).logits, model(ids).logits)
    assert torch.equal(lrqat_dist.load_causal_lm(config=tiny_config("mistral"), seed=3)(ids).logits,
                       model(ids).logits)
    with pytest.raises(FileNotFoundError, match="not a local HF model directory"):
        lrqat_dist.load_causal_lm(path=tmp_path / "nope")
    with pytest.raises(ValueError, match="exactly one of model.path"):
        lrqat_dist.load_causal_lm()
    with pytest.raises(ValueError, match="model_type"):
        lrqat_dist.load_causal_lm(config={"hidden_size": 8})
