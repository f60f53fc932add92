"""Checkpoints of a training run: the on-disk layout (:mod:`.layout`), writing and restoring them while
training (:mod:`.checkpointer`), and reading them offline for export and eval (:mod:`.reader`).

    from lrqat_dist.checkpoint import list_checkpoints, read_meta, resolve_checkpoint
    ckpt = resolve_checkpoint("runs/tiny-cpu")          # newest complete checkpoint of a run
    meta = read_meta(ckpt)                                # None unless complete

A run's model back in memory (base model + prepare + trained tensors) is
:func:`lrqat_dist.export.run.load_run`.
"""
from .checkpointer import Checkpointer, capture_rng, restore_rng
from .layout import (CHECKPOINTS, CONFIG_FILE, META_FILE, TOKENIZER_DIR, TRAINABLE_FILE, TRAINED_BUFFERS_FILE,
                     checkpoint_path, config_file, is_run_or_checkpoint, list_checkpoints, read_meta, require_meta,
                     resolve_checkpoint, resolve_resume, run_dir)
from .reader import load_trainable_, load_trained_buffers_from, payload_buffers, payload_trainable, read_trainable

__all__ = ["Checkpointer", "capture_rng", "restore_rng", "CHECKPOINTS", "CONFIG_FILE", "META_FILE", "TOKENIZER_DIR",
           "TRAINABLE_FILE", "TRAINED_BUFFERS_FILE", "checkpoint_path", "config_file", "is_run_or_checkpoint",
           "list_checkpoints", "read_meta", "require_meta", "resolve_checkpoint", "resolve_resume", "run_dir",
           "load_trainable_", "load_trained_buffers_from", "payload_buffers", "payload_trainable", "read_trainable"]
