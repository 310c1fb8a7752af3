"""Per-image encoder features kept in RAM between clicks: a small LRU bounded by age and size.

An annotator clicks many times on the same image; SAM2's image encoder is by far the most
expensive step that does not depend on the clicks, so its output for every slice of the image
is computed on the first click and reused by the next ones. What is kept is the decoder-ready
features (after ``conv_s0``/``conv_s1``: 32 + 64 + 256 channels at strides 4/8/16, about 8 MB a
slice at 1024 px in bfloat16) plus one copy of the positional encoding, which is the same for
every slice. Entries are evicted least-recently-used first when the byte budget or the entry
count is exceeded, and when unused for longer than ``max_age_s``; an image that alone exceeds
the budget is served but not kept.

The counters (hits, misses, evictions, encoded slices) are exposed by the infer tasks'
``info()`` and so through MONAI Label's ``/info``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from monai_sam.networks.sam2_volume import PreparedFeatures

__all__ = ["VolumeFeatures", "FeatureStoreStats", "VolumeFeatureStore"]

logger = logging.getLogger(__name__)


@dataclass
class VolumeFeatures:
    """Decoder-ready features of all slices of one image, and what is needed to use them."""

    backbone_fpn: list[torch.Tensor]  # per level (T, C, h, w), stored dtype
    vision_pos_enc: list[torch.Tensor]  # per level (1, C, h, w): the same for every slice
    geometry: Any = None  # what the caller needs to map clicks and write labels (no voxels)
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)

    @property
    def num_slices(self) -> int:
        return int(self.backbone_fpn[0].shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.backbone_fpn, *self.vision_pos_enc))

    def as_network_features(self) -> PreparedFeatures:
        """The ``features=`` argument of `Sam2VolumeSegmenter.propagate` (positions broadcast, no copy)."""
        t = self.num_slices
        return PreparedFeatures(
            backbone_fpn=list(self.backbone_fpn),
            vision_pos_enc=[p.expand(t, -1, -1, -1) for p in self.vision_pos_enc],
        )


@dataclass
class FeatureStoreStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    too_large: int = 0  # computed but not kept: larger than the whole budget
    encoded_slices: int = 0


class VolumeFeatureStore:
    """Thread-safe LRU of `VolumeFeatures` keyed by image identity.

    Args:
        max_bytes: total size of the kept features (the dominant memory of the app).
        max_entries: most images kept at once.
        max_age_s: an entry unused for this long is dropped (images an annotator left).
    """

    def __init__(self, max_bytes: int = 8 << 30, max_entries: int = 4, max_age_s: float = 1800.0) -> None:
        if int(max_entries) < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        if float(max_age_s) <= 0 or int(max_bytes) <= 0:
            raise ValueError(f"max_age_s and max_bytes must be positive, got {max_age_s}, {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.max_entries = int(max_entries)
        self.max_age_s = float(max_age_s)
        self.stats = FeatureStoreStats()
        self._entries: OrderedDict[Hashable, VolumeFeatures] = OrderedDict()
        self._lock = threading.RLock()
        self._key_locks: dict[Hashable, threading.Lock] = {}

    # ------------------------------------------------------------------ housekeeping
    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def _drop(self, key: Hashable, why: str) -> None:
        entry = self._entries.pop(key)
        self.stats.evictions += 1
        logger.info("feature cache: dropped %s (%s, %.0f MB)", key, why, entry.nbytes / 2**20)

    def expire(self, now: float | None = None) -> None:
        """Drop the entries unused for longer than ``max_age_s``."""
        now = time.monotonic() if now is None else now
        with self._lock:
            for key in [k for k, e in self._entries.items() if now - e.last_used > self.max_age_s]:
                self._drop(key, f"unused for more than {self.max_age_s:.0f} s")

    def _make_room(self, incoming: int) -> None:
        while self._entries and (
            len(self._entries) >= self.max_entries or self.nbytes + incoming > self.max_bytes
        ):
            self._drop(next(iter(self._entries)), "least recently used")

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def info(self) -> dict[str, Any]:
        """Counters and occupancy, JSON-friendly (what ``/info`` shows)."""
        with self._lock:
            return {
                **asdict(self.stats),
                "entries": len(self._entries),
                "bytes": self.nbytes,
                "max_bytes": self.max_bytes,
                "max_entries": self.max_entries,
                "max_age_s": self.max_age_s,
            }

    # ------------------------------------------------------------------ access
    def get_or_compute(
        self, key: Hashable, compute: Callable[[], VolumeFeatures]
    ) -> tuple[VolumeFeatures, bool]:
        """The entry for ``key``, computing (and keeping, budget allowing) it on a miss.

        Returns ``(features, hit)``. Concurrent requests for the same image wait for one
        computation instead of encoding it twice.
        """
        self.expire()
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    entry.last_used = time.monotonic()
                    self.stats.hits += 1
                    return entry, True
                self.stats.misses += 1
            entry = compute()  # outside the store lock: other images stay servable
            with self._lock:
                self.stats.encoded_slices += entry.num_slices
                size = entry.nbytes
                if size > self.max_bytes:
                    self.stats.too_large += 1
                    logger.warning(
                        "feature cache: the features of %s take %.0f MB, more than the whole budget "
                        "(%.0f MB); they are not kept and the next click re-encodes the image "
                        "(raise feature_cache_gb)",
                        key,
                        size / 2**20,
                        self.max_bytes / 2**20,
                    )
                else:
                    self._make_room(size)
                    self._entries[key] = entry
            with self._lock:
                self._key_locks.pop(key, None)
            return entry, False
