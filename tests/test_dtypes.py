"""The one dtype table (lrqat_dist.dtypes) and the modules that read their names from it."""
import pytest
import torch

from lrqat_dist.dtypes import DTYPES, dtype_bytes, dtype_name, parse_dtype
from lrqat_dist.memory.planner import DTYPE_BYTES, PlanConfig
from lrqat_dist.engines.config import DTYPES as TRAIN_DTYPES


def test_spellings_and_errors():
    for name, want in [("fp32", torch.float32), ("float32", torch.float32), ("BF16", torch.bfloat16),
                       ("torch.bfloat16", torch.bfloat16), ("fp16", torch.float16), (torch.float16, torch.float16)]:
        assert parse_dtype(name) is want
    assert [dtype_name(parse_dtype(n)) for n in ("fp32", "bf16", "fp16")] == ["float32", "bfloat16", "float16"]
    assert dtype_bytes("bf16") == 2 and dtype_bytes(torch.float32) == 4
    with pytest.raises(ValueError, match="expected one of float32, fp32, bfloat16"):
        parse_dtype("int8")
    with pytest.raises(ValueError, match="expected float32, bfloat16 or float16"):
        parse_dtype(torch.float64)


def test_modules_share_the_table():
    assert TRAIN_DTYPES == ("auto", "float32", "bfloat16", "float16")  # the HF spelling of every table dtype
    assert DTYPE_BYTES == {n: t.itemsize for n, t in DTYPES.items()}
    assert PlanConfig(dtype="bfloat16").e == PlanConfig(dtype="bf16").e == 2
    with pytest.raises(ValueError, match="dtype"):
        PlanConfig(dtype="int8")
