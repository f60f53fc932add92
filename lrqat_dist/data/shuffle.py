"""Seeded document shuffle buffer whose contents are part of the resumable state."""

from __future__ import annotations

import random
from typing import Any, Callable, Optional

from .records import Document


def rng_state(rng: random.Random) -> list:
    """``random.Random`` state as nested lists (loadable with ``torch.load(weights_only=True)``)."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_rng_state(rng: random.Random, state: list) -> None:
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))


class ShuffleBuffer:
    """Keeps ``size`` documents; each request refills it and returns a uniformly drawn one.

    ``size == 0`` passes documents through in order.
    """

    def __init__(self, size: int, seed: str):
        self._size = size
        self._rng = random.Random(seed)
        self._docs: list[Document] = []

    def next(self, pull: Callable[[], Optional[Document]]) -> Optional[Document]:
        if self._size == 0:
            return pull()
        while len(self._docs) < self._size:
            doc = pull()
            if doc is None:
                break
            self._docs.append(doc)
        if not self._docs:
            return None
        i = self._rng.randrange(len(self._docs))
        # Swap-remove: O(1), and the order it leaves is itself part of the state.
        self._docs[i], self._docs[-1] = self._docs[-1], self._docs[i]
        return self._docs.pop()

    def state_dict(self) -> dict[str, Any]:
        return {"docs": [[d.text, d.set_name] for d in self._docs], "rng": rng_state(self._rng)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self._docs = [Document(t, s) for t, s in sd["docs"]]
        set_rng_state(self._rng, sd["rng"])
