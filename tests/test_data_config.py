"""DataConfig: the YAML `data:` section, its defaults and its errors."""

import pytest

from lrqat_dist.data import DataConfig


def test_defaults_and_from_dict():
    cfg = DataConfig.from_dict(
        {
            "train_files": ["a/*.jsonl.zst", "b"],
            "seq_len": 2048,
            "add_bos": True,
            "max_doc_tokens": 1024,
            "include_sets": ["RedPajamaC4"],
            "set_weights": {"RedPajamaC4": 2, "RedPajamaBook": 0.5},
            "hf_data_files": {"train": ["x.jsonl.zst"]},
        }
    )
    assert cfg.seq_len == 2048 and cfg.add_bos and cfg.max_doc_tokens == 1024
    assert cfg.set_weights == {"RedPajamaC4": 2, "RedPajamaBook": 0.5}
    assert DataConfig.from_dict(None) == DataConfig()
    assert DataConfig().seq_len == 1024 and DataConfig().shuffle_buffer == 0
    assert DataConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match=r"data\.seq_length: unknown key"):
        DataConfig.from_dict({"seq_length": 12})


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("seq_len", "1024", "data.seq_len: expected int, got str"),
        ("seq_len", True, "data.seq_len: expected int, got bool"),
        ("seq_len", 1.5, "data.seq_len: expected int, got float"),
        ("add_bos", 1, "data.add_bos: expected bool, got int"),
        ("max_doc_tokens", "all", "data.max_doc_tokens: expected int | null, got str"),
        ("include_sets", "RedPajamaC4", "data.include_sets: expected list[str] | null, got str"),
        ("include_sets", [1, 2], "data.include_sets: expected list[str] | null, got list[int]"),
        ("set_weights", {"RedPajamaC4": "2"}, "data.set_weights: expected dict[str, float] | null"),
        ("train_files", 3, "data.train_files: expected str | list[str] | null, got int"),
        ("shuffle_buffer", None, "data.shuffle_buffer: expected int, got null"),
    ],
)
def test_wrong_type_is_named(key, value, message):
    with pytest.raises(ValueError) as e:
        DataConfig.from_dict({key: value})
    assert message in str(e.value)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("seq_len", 0, "data.seq_len: must be >= 1"),
        ("num_workers", -1, "data.num_workers: must be >= 0"),
        ("text_unit", "line", "data.text_unit: must be one of"),
        ("set_weights", {"RedPajamaC4": -1.0}, "data.set_weights.RedPajamaC4: must be >= 0"),
        ("max_doc_tokens", 0, "data.max_doc_tokens: must be >= 1"),
    ],
)
def test_bad_values(key, value, message):
    with pytest.raises(ValueError, match=message):
        DataConfig.from_dict({key: value})


def test_not_a_mapping():
    with pytest.raises(ValueError, match="data: expected a mapping, got list"):
        DataConfig.from_dict([1, 2])


def test_direct_construction_is_checked_too():
    with pytest.raises(ValueError, match="data.val_blocks: expected int, got str"):
        DataConfig(val_blocks="8")
