"""Train and validation loaders: what the trainer iterates, checkpoints and resumes.

Resume with worker processes: each worker runs one reader stream and sends its full state
along with a batch (every ``data.state_every`` batches, and always with its first). Batches
reach the main process round-robin over workers (``torch.utils.data.DataLoader`` keeps that
order), and the main process records, per worker, the state of the last batch it *handed to
the caller*: batches a worker prefetched but nobody consumed are not in the saved state, and
are produced again after a resume. On resume the worker that is next in the round-robin is
made physical worker 0, so the order continues exactly. What a worker replays after its last state
is counted in blocks (``replay_blocks``), not batches, so a resume with another micro-batch size
replays exactly the blocks that were consumed.

Signals: the workers ignore SIGTERM and SIGINT (:func:`ignore_termination_signals`). Launchers
(torchrun, the deepspeed launcher, SLURM) and Ctrl-C signal the whole process group; the trainer owns
shutdown (it saves a checkpoint, then stops the workers), and a worker that died on the signal would
make the next batch fail with "DataLoader worker exited unexpectedly" before anything is saved. The
signals are blocked in the trainer while it forks the workers, so none can arrive in the window before
a worker has installed its ignore handlers (it is delivered to the trainer right after).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .config import DataConfig
from .records import SKIP_KINDS
from .units import describe_files, resolve_files
from .reshard import ReshardReport, exact_reader_state, reshard_reader_states, with_readers
from .stream import ReaderStream, StreamSpec

logger = logging.getLogger(__name__)

LOADER_STATE_FORMAT = 1


def build_train_loader(
    cfg: DataConfig,
    tokenizer: Any,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> "TrainLoader":
    """Infinite, resumable loader of ``{"input_ids": LongTensor[micro_batch_size, seq_len]}``.

    Labels are the input ids (the model shifts). Every rank reads a disjoint part of each epoch
    and never runs dry (epochs cycle), so all ranks can take the same number of batches.
    """
    _check_rank(micro_batch_size, rank, world_size)
    workers = max(1, cfg.num_workers)
    if cfg.train_files is not None:
        files: Optional[tuple[str, ...]] = tuple(resolve_files(cfg.train_files, "data.train_files"))
        split = None
    elif cfg.hf_dataset is not None:
        files, split = None, cfg.hf_split
    else:
        raise ValueError("data: set data.train_files (local files) or data.hf_dataset")
    spec = StreamSpec(cfg, files, split, seed, world_size * workers, train=True)
    return TrainLoader(spec, tokenizer, micro_batch_size, rank, world_size)


def build_val_loader(
    cfg: DataConfig,
    tokenizer: Any,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
) -> "ValLoader":
    """Finite, deterministic, re-iterable validation loader over the holdout files.

    The first ``data.val_blocks`` blocks of the holdout stream (files in sorted order, no
    shuffle) are dealt round-robin to ranks; every rank gets the same number of blocks
    (``floor(blocks / world_size)``) and hence of batches (the last batch may be smaller).
    """
    _check_rank(micro_batch_size, rank, world_size)
    if cfg.val_files is not None:
        files: Optional[tuple[str, ...]] = tuple(resolve_files(cfg.val_files, "data.val_files"))
        split = None
    elif cfg.hf_dataset is not None:
        files, split = None, cfg.hf_val_split
    else:
        raise ValueError("data: set data.val_files (local holdout files) or data.hf_dataset")
    spec = StreamSpec(cfg, files, split, 0, 1, train=False)
    return ValLoader(spec, tokenizer, micro_batch_size, rank, world_size)


def _check_rank(micro_batch_size: int, rank: int, world_size: int) -> None:
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def _passthrough(item: Any) -> Any:
    return item


TERMINATION_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def ignore_termination_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of the train loader: this worker ignores SIGTERM/SIGINT (the trainer saves and
    then stops it; it also exits on its own when the trainer process dies) and unblocks them again."""
    for s in TERMINATION_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, TERMINATION_SIGNALS)


@contextlib.contextmanager
def termination_signals_blocked():
    """Hold SIGTERM/SIGINT pending in this thread (workers forked now inherit the mask); delivered on exit."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, TERMINATION_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class _RankWorkers(IterableDataset):
    """The per-worker side: worker ``w`` streams reader ``rank * W + (w + rotation) % W``."""

    def __init__(self, spec: StreamSpec, tokenizer: Any, mbs: int, rank: int, resume: list, rotation: int):
        self.spec, self.tokenizer, self.mbs, self.rank = spec, tokenizer, mbs, rank
        self.resume, self.rotation = resume, rotation

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        num = len(self.resume)
        logical = ((info.id if info is not None else 0) + self.rotation) % num
        reader = ReaderStream(self.spec, self.tokenizer, self.rank * num + logical)
        saved = self.resume[logical]
        if saved["state"] is not None:
            reader.load_state_dict(saved["state"])
        _replay(reader, saved["replay_blocks"])
        every = self.spec.cfg.state_every
        n = 0
        while True:
            batch = reader.next_batch(self.mbs)
            state = reader.state_dict() if n % every == 0 else None
            n += 1
            yield logical, batch, state, reader.skip_counts()


def _replay(reader: ReaderStream, blocks: int) -> None:
    """Skip the ``blocks`` blocks consumed after ``reader``'s restored state."""
    for _ in range(blocks):
        reader.next_block()


class TrainLoader:
    """Iterate for batches; ``state_dict()`` after any batch resumes right after it.

    A new ``iter()`` continues from the last consumed batch (and invalidates older iterators);
    call ``load_state_dict()`` before iterating.
    """

    def __init__(self, spec: StreamSpec, tokenizer: Any, micro_batch_size: int, rank: int, world_size: int):
        self._spec, self._tokenizer = spec, tokenizer
        self._mbs, self._rank, self._world = micro_batch_size, rank, world_size
        self._num_workers = spec.cfg.num_workers
        self._slots = max(1, self._num_workers)  # logical workers (readers) of this rank
        self._consumed = 0
        self._workers = [self._fresh_slot() for _ in range(self._slots)]
        self._inproc: Optional[ReaderStream] = None
        self._live: Optional[object] = None

    @staticmethod
    def _fresh_slot(state: Optional[dict] = None, replay_blocks: int = 0) -> dict:
        skips = dict(state["skips"]) if state is not None else dict.fromkeys(SKIP_KINDS, 0)
        return {"state": state, "replay_blocks": replay_blocks, "skips": skips}

    @property
    def micro_batch_size(self) -> int:
        return self._mbs

    @property
    def readers_per_rank(self) -> int:
        """Reader streams of this rank (``max(1, data.num_workers)``)."""
        return self._slots

    @property
    def batches_consumed(self) -> int:
        return self._consumed

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._sync_inproc()
        self._live = token = object()
        if self._num_workers == 0:
            return self._iter_inproc(token)
        return self._iter_workers(token)

    def _check_live(self, token: object) -> None:
        if self._live is not token:
            raise RuntimeError(
                "this data iterator was superseded by a newer iter(loader) or load_state_dict()"
            )

    def _iter_inproc(self, token: object) -> Iterator[dict[str, torch.Tensor]]:
        slot = self._workers[0]
        reader = ReaderStream(self._spec, self._tokenizer, self._rank)
        if slot["state"] is not None:
            reader.load_state_dict(slot["state"])
        _replay(reader, slot["replay_blocks"])
        self._inproc = reader
        while True:
            self._check_live(token)
            batch = reader.next_batch(self._mbs)
            self._consumed += 1
            yield {"input_ids": batch}

    def _iter_workers(self, token: object) -> Iterator[dict[str, torch.Tensor]]:
        resume = [{"state": w["state"], "replay_blocks": w["replay_blocks"]} for w in self._workers]
        dataset = _RankWorkers(
            self._spec, self._tokenizer, self._mbs, self._rank, resume, self._consumed % self._slots
        )
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self._num_workers,
            collate_fn=_passthrough,
            prefetch_factor=self._spec.cfg.prefetch_factor,
            worker_init_fn=ignore_termination_signals,
        )
        with termination_signals_blocked():  # the workers start here
            batches = iter(loader)
        try:
            for logical, batch, state, skips in batches:
                self._check_live(token)
                if logical != self._consumed % self._slots:
                    raise RuntimeError(
                        f"data workers out of order: got worker {logical}, expected "
                        f"{self._consumed % self._slots}; exact resume is not possible"
                    )
                slot = self._workers[logical]
                if state is not None:
                    slot["state"], slot["replay_blocks"] = state, 0
                else:
                    slot["replay_blocks"] += len(batch)
                slot["skips"] = skips
                self._consumed += 1
                yield {"input_ids": batch}
        finally:
            # Stop the workers now. Left to the garbage collector (a worker error puts the
            # iterator in a reference cycle), the queues may be finalized first and every worker
            # then waits out a 5 s join timeout.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def _sync_inproc(self) -> None:
        if self._inproc is not None:
            self._workers[0] = self._fresh_slot(self._inproc.state_dict())
            self._inproc = None

    def skip_counts(self) -> dict[str, int]:
        """Bad input skipped so far by this rank, by kind (see ``records.SKIP_KINDS``)."""
        if self._inproc is not None:
            return self._inproc.skip_counts()
        total = dict.fromkeys(SKIP_KINDS, 0)
        for w in self._workers:
            for k, v in w["skips"].items():
                total[k] = total.get(k, 0) + v
        return total

    def state_dict(self) -> dict[str, Any]:
        """State after the last consumed batch (plain containers and tensors: torch.save-able)."""
        self._sync_inproc_copy()
        return {
            "format": LOADER_STATE_FORMAT,
            "rank": self._rank,
            "world_size": self._world,
            "workers_per_rank": self._slots,
            "seed": self._spec.seed,
            "source": self._spec.source_id,
            "consumed": self._consumed,
            "micro_batch_size": self._mbs,
            "workers": [{"state": w["state"], "replay_blocks": w["replay_blocks"]} for w in self._workers],
        }

    def _sync_inproc_copy(self) -> None:
        # The in-process reader is live: take its state without stopping it.
        if self._inproc is not None:
            self._workers[0] = self._fresh_slot(self._inproc.state_dict())

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; the next ``iter()`` continues exactly after it."""
        if sd.get("format") != LOADER_STATE_FORMAT:
            raise ValueError(f"data loader state: unknown format {sd.get('format')!r}")
        want = {
            "rank": self._rank,
            "world_size": self._world,
            "workers_per_rank": self._slots,
            "seed": self._spec.seed,
            "source": self._spec.source_id,
        }
        diff = {k: (sd.get(k), v) for k, v in want.items() if sd.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"data loader state does not match this loader ({detail})")
        self._live = None
        self._inproc = None
        self._consumed = int(sd["consumed"])
        # States written before replay was counted in blocks hold "replay" batches and no
        # "micro_batch_size": the current one is assumed (what those versions did).
        saved_mbs = int(sd.get("micro_batch_size", self._mbs))
        self._workers = [
            self._fresh_slot(w["state"], int(w["replay_blocks"]) if "replay_blocks" in w
                             else int(w["replay"]) * saved_mbs)
            for w in sd["workers"]
        ]
        if saved_mbs != self._mbs:
            logger.info("data loader state: micro_batch_size %d -> %d; replaying %d blocks after the saved "
                        "reader states", saved_mbs, self._mbs, sum(w["replay_blocks"] for w in self._workers))


    def load_resharded_state(self, states: list[dict[str, Any]]) -> ReshardReport:
        """Elastic resume: ``states`` are the ``state_dict()`` of every rank of a job with another world
        size (or worker count), in rank order; this loader takes its part of what they had left to read
        (:mod:`lrqat_dist.data.reshard`: no document of the current epoch is skipped). Returns the
        report, also logged."""
        if not states:
            raise ValueError("data loader: no saved rank states to re-deal")
        for sd in states:
            if sd.get("format") != LOADER_STATE_FORMAT:
                raise ValueError(f"data loader state: unknown format {sd.get('format')!r}")
            for key, now in (("seed", self._spec.seed), ("source", self._spec.source_id)):
                if sd.get(key) != now:
                    raise ValueError(f"data loader state does not match this loader ({key}: saved "
                                     f"{sd.get(key)!r}, now {now!r}); an elastic resume needs the same data and seed")
        old_world, old_slots = len(states), int(states[0]["workers_per_rank"])
        old_spec = with_readers(self._spec, old_world * old_slots)
        old_readers = []
        for rank, sd in enumerate(states):
            if int(sd["rank"]) != rank or int(sd["world_size"]) != old_world:
                raise ValueError(f"data loader states: entry {rank} is rank {sd['rank']} of {sd['world_size']}")
            mbs = int(sd.get("micro_batch_size", self._mbs))
            for w, slot in enumerate(sd["workers"]):
                blocks = int(slot["replay_blocks"]) if "replay_blocks" in slot else int(slot["replay"]) * mbs
                old_readers.append(exact_reader_state(old_spec, self._tokenizer, rank * old_slots + w,
                                                      slot["state"], blocks))
        new_states, report = reshard_reader_states(old_readers, old_spec, self._spec, self._tokenizer)
        mine = new_states[self._rank * self._slots:(self._rank + 1) * self._slots]
        self._live = None
        self._inproc = None
        self._consumed = 0
        self._workers = [self._fresh_slot(st) for st in mine]
        logger.info("%s", report.describe())
        return report


class ValLoader:
    """Re-iterable validation batches; identical on every pass (blocks are cached)."""

    def __init__(self, spec: StreamSpec, tokenizer: Any, micro_batch_size: int, rank: int, world_size: int):
        self._spec, self._tokenizer = spec, tokenizer
        self._mbs, self._rank, self._world = micro_batch_size, rank, world_size
        self._blocks: Optional[torch.Tensor] = None
        self._skips = dict.fromkeys(SKIP_KINDS, 0)

    def _load(self) -> torch.Tensor:
        if self._blocks is None:
            cfg = self._spec.cfg
            reader = ReaderStream(self._spec, self._tokenizer, 0)
            blocks = []
            while len(blocks) < cfg.val_blocks:
                block = reader.next_block()
                if block is None:
                    break
                blocks.append(torch.from_numpy(block))
            self._skips = reader.skip_counts()
            per_rank = len(blocks) // self._world
            where = (
                describe_files(list(self._spec.files))
                if self._spec.files is not None
                else self._spec.describe()
            )
            if per_rank == 0:
                raise ValueError(
                    f"data.val_files: {where} holds {len(blocks)} full block(s) of "
                    f"{cfg.seq_len} tokens, fewer than world_size={self._world}"
                )
            if len(blocks) < cfg.val_blocks:
                logger.warning(
                    "validation data %s holds only %d of data.val_blocks=%d blocks of %d tokens",
                    where, len(blocks), cfg.val_blocks, cfg.seq_len,
                )
            mine = blocks[self._rank :: self._world][:per_rank]
            self._blocks = torch.stack(mine)
        return self._blocks

    @property
    def num_blocks(self) -> int:
        """Blocks this rank evaluates (the same on every rank)."""
        return len(self._load())

    def __len__(self) -> int:
        return math.ceil(self.num_blocks / self._mbs)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        blocks = self._load()
        for i in range(0, len(blocks), self._mbs):
            yield {"input_ids": blocks[i : i + self._mbs]}

    def skip_counts(self) -> dict[str, int]:
        """Bad input skipped while reading the validation blocks."""
        self._load()
        return dict(self._skips)
