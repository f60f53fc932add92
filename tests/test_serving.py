"""What serves where: the runtime table behind tools/export.py --target."""
import pytest

import lrqat_dist
from lrqat_dist.export import ExportRefused
from lrqat_dist.export.serving import require_target, serving_verdicts

from conftest import tiny_config

pytest.importorskip("compressed_tensors")


def _model(hidden=64, activations=None, **quant):
    model = lrqat_dist.load_causal_lm(config=tiny_config(hidden_size=hidden, intermediate_size=2 * hidden))
    cfg = {"bits": 4, "group_size": None, "symmetric": True, **quant}
    return lrqat_dist.prepare(model, lrqat_dist.QATConfig(rank=4, range_init="minmax", activations=activations, **cfg))


@pytest.mark.parametrize("quant,vllm,llama", [
    ({}, "Marlin uint4b8", "Q4_0 x14"),
    ({"symmetric": False, "group_size": 32}, "Marlin uint4 + zero-points", "Q4_1 x14"),
    ({"bits": 8}, "Marlin uint8b128", "Q8_0 x14"),
    ({"bits": 8, "symmetric": False, "group_size": 32}, None, "Q8_0 x14"),  # Machete: groups -1/64/128
    ({"bits": 3}, None, "Q4_0 x14"),
    ({"bits": 4, "group_size": 16}, None, None),
])
def test_verdicts(quant, vllm, llama):
    v = serving_verdicts(_model(**quant))
    assert v["transformers"].serves
    assert v["vllm"].serves == (vllm is not None) and (vllm is None or vllm in v["vllm"].how), v["vllm"].line()
    assert v["llama.cpp"].serves == (llama is not None) and (llama is None or llama in v["llama.cpp"].how)
    if quant.get("group_size") == 16:
        assert any("nearest servable: g32" in p for p in v["vllm"].problems)
        assert any("nearest exportable setting: group_size 32" in p for p in v["llama.cpp"].problems)


def test_activation_schemes_and_targets():
    a8 = _model(activations="a8")
    v = serving_verdicts(a8)
    assert "CompressedTensorsW4A8Int" in v["vllm"].how and v["vllm"].serves and not v["llama.cpp"].serves
    require_target(a8, "vllm", "compressed-tensors")
    require_target(a8, "llama.cpp", "gguf", drop_activation_quant=True)  # the user accepts losing it
    with pytest.raises(ExportRefused, match="does not travel in GGUF"):
        require_target(a8, "llama.cpp", "gguf")
    asym = _model(activations="a8asym")
    with pytest.raises(ExportRefused, match="asymmetric int8 inputs"):
        require_target(asym, "vllm", "compressed-tensors")
    kv = _model(activations="a8kv4")
    assert not serving_verdicts(kv)["transformers"].serves  # KV quantization is not run by compressed-tensors
    with pytest.raises(ExportRefused, match="reads compressed-tensors or dequantized, not format 'gguf'"):
        require_target(_model(), "vllm", "gguf")
    w3 = _model(bits=3)
    require_target(w3, "vllm", "dequantized")  # dense weights: any grid is served
    with pytest.raises(ExportRefused, match="W3: no vLLM GPU kernel"):
        require_target(w3, "vllm", "compressed-tensors")


@pytest.mark.parametrize("activations,quant,how", [
    ("a8asym", {}, "Marlin uint4b8"),  # asymmetric int8 inputs: gone once dropped
    ("a8", {"symmetric": False, "group_size": 32}, "Marlin uint4 + zero-points"),  # asym weights + a8
])
def test_dropping_activation_quant_checks_the_weights_only_scheme(activations, quant, how):
    """--drop-activation-quant exports W4A16: the vLLM verdict is that scheme's, not W4A8's."""
    model = _model(activations=activations, **quant)
    assert not serving_verdicts(model)["vllm"].serves  # as trained (int8 inputs), vLLM refuses it
    v = require_target(model, "vllm", "compressed-tensors", drop_activation_quant=True)
    assert v.serves and how in v.how and "W4A8" not in v.how, v.line()
    assert serving_verdicts(model, drop_activation_quant=True)["llama.cpp"].serves


def test_asymmetric_inputs_problem_listed_once():
    from lrqat_dist.export.serving import _check_vllm
    from lrqat_dist.methods.act_config import ActQuantConfig
    from lrqat_dist.quant.affine import QuantSpec

    specs = {f"model.layers.0.mlp.{t}": QuantSpec(4, True, g) for t, g in (("gate_proj", 32), ("up_proj", 32),
                                                                          ("down_proj", 64))}
    specs["model.layers.0.self_attn.o_proj"] = QuantSpec(4, True, None)
    problems = _check_vllm(specs, {}, ActQuantConfig.from_value("a8asym")).problems  # 3 distinct specs
    assert sum("asymmetric int8 inputs" in p for p in problems) == 1, problems


def test_shipped_recipes_pass_the_vllm_check():
    """Done-when of issue 17: --target vllm passes the shipped recipes (their quant: sections)."""
    from pathlib import Path

    from lrqat_dist.export.serving import vllm_verdict_for_config
    from lrqat_dist.train.config import load_config

    recipes = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert len(recipes) >= 8
    for path in recipes:
        v = vllm_verdict_for_config(load_config(path).quant)
        assert v.serves and "CompressedTensorsWNA16" in v.how, f"{path.name}: {v.line()}"
