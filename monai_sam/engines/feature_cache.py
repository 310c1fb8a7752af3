"""A cache of a frozen image encoder's raw outputs, one entry per slice.

Frozen means cacheable: the encoder is by far the most expensive part of SAM / SAM2 and its
output for a slice never changes while it is frozen, so training computes it once (first
epoch) and reads it back afterwards. Entries live on disk as memory-mapped files (a RAM tier
in front is optional) and are keyed by everything that changes the output: the encoder's
identity (name and a hash of its weights, hence of the checkpoint), the input size, the
preprocessing, and the hash of the slice's content. Any change misses; an entry whose checksum
does not match is treated as corrupted, deleted and recomputed.

Cache the encoder's *raw* outputs: SAM2's ``forward_image`` applies the mask decoder's trainable
``conv_s0``/``conv_s1`` to the high-resolution levels, so caching after it would silently
freeze them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["FeatureCache", "CacheStats", "encoder_identity", "tensor_content_hash"]

logger = logging.getLogger(__name__)

_MAGIC = b"MSAMFEAT1"
_SUFFIX = ".feat"
Features = dict[str, torch.Tensor]


def tensor_content_hash(x: torch.Tensor) -> str:
    """SHA-1 of a tensor's values, shape and dtype (the slice part of a cache key)."""
    arr = x.detach().cpu().contiguous().numpy()
    h = hashlib.sha1(f"{arr.shape}|{arr.dtype}|".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def encoder_identity(
    name: str, encoder: torch.nn.Module, image_size: int, preprocessing: Mapping | str = ""
) -> str:
    """A stable identity for (encoder, weights, input size, preprocessing).

    Hashing the weights themselves (not a checkpoint path) makes two runs share a cache
    exactly when they would compute the same features, whether the weights came from an
    official file, our training or a seeded random initialisation.
    """
    h = hashlib.sha256(f"{name}|{int(image_size)}|".encode())
    h.update(json.dumps(preprocessing, sort_keys=True, default=str).encode())
    for key, value in sorted(encoder.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    ram_hits: int = 0
    corrupted: int = 0
    skipped_writes: int = 0  # entries not written because the size cap was reached
    disk_bytes: int = 0


class FeatureCache:
    """Per-slice store of encoder outputs (``dict[str, Tensor]``), on disk with an optional RAM tier.

    Args:
        cache_dir: root folder; each encoder identity gets its own sub-folder.
        identity: what the features depend on besides the slice (see `encoder_identity`).
        ram_bytes: size of the in-memory LRU tier in bytes (0 disables it).
        max_disk_bytes: cap on this identity's disk usage; beyond it, new slices are computed
            but not stored (logged once). ``None`` means no cap.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        identity: str,
        ram_bytes: int = 0,
        max_disk_bytes: int | None = None,
    ) -> None:
        self.root = Path(cache_dir) / identity[:32]
        self.root.mkdir(parents=True, exist_ok=True)
        self.identity = identity
        self.ram_bytes = int(ram_bytes)
        self.max_disk_bytes = max_disk_bytes
        self._ram: OrderedDict[str, Features] = OrderedDict()
        self._ram_used = 0
        self._warned_full = False
        self.stats = CacheStats(disk_bytes=sum(p.stat().st_size for p in self.root.rglob(f"*{_SUFFIX}")))
        logger.info(
            "feature cache %s: %.1f MB on disk%s",
            self.root,
            self.stats.disk_bytes / 1e6,
            f", cap {max_disk_bytes / 1e9:.2f} GB" if max_disk_bytes else "",
        )

    # -- public API -------------------------------------------------------------------------
    def get_or_compute(
        self,
        slices: torch.Tensor,
        compute: Callable[[torch.Tensor], Sequence[Features]],
        batch_size: int = 8,
    ) -> list[Features]:
        """Features of each slice in ``slices`` (shape ``(T, ...)``), computing only the misses.

        ``compute`` takes a batch of slices and returns one feature dict per slice; it runs on
        the misses in batches of ``batch_size``.
        """
        keys = [tensor_content_hash(s) for s in slices]
        out: list[Features | None] = [self.get(k) for k in keys]
        missing = [i for i, f in enumerate(out) if f is None]
        for start in range(0, len(missing), batch_size):
            idx = missing[start : start + batch_size]
            computed = compute(slices[idx])
            if len(computed) != len(idx):
                raise RuntimeError(f"feature function returned {len(computed)} results for {len(idx)} slices")
            for i, feats in zip(idx, computed):
                self.put(keys[i], feats)
                out[i] = {k: v.detach() for k, v in feats.items()}
        return out  # type: ignore[return-value]

    def get(self, key: str) -> Features | None:
        """The cached features for a slice key, or None (miss, or a corrupted entry removed)."""
        if key in self._ram:
            self._ram.move_to_end(key)
            self.stats.hits += 1
            self.stats.ram_hits += 1
            return self._ram[key]
        path = self._path(key)
        if not path.exists():
            self.stats.misses += 1
            return None
        try:
            feats = _read_entry(path)
        except (OSError, ValueError) as err:
            logger.warning("feature cache: corrupted entry %s (%s); it will be recomputed", path, err)
            self.stats.corrupted += 1
            self.stats.misses += 1
            self._remove(path)
            return None
        self.stats.hits += 1
        self._remember(key, feats)
        return feats

    def put(self, key: str, feats: Mapping[str, torch.Tensor]) -> None:
        """Store a slice's features (atomically: a reader never sees half an entry)."""
        arrays = {k: v.detach().cpu().contiguous().numpy() for k, v in feats.items()}
        size = sum(a.nbytes for a in arrays.values())
        path = self._path(key)
        if not path.exists():
            if self.max_disk_bytes is not None and self.stats.disk_bytes + size > self.max_disk_bytes:
                self.stats.skipped_writes += 1
                if not self._warned_full:
                    logger.warning(
                        "feature cache %s reached its cap (%.2f GB): further slices are computed, not stored",
                        self.root,
                        self.max_disk_bytes / 1e9,
                    )
                    self._warned_full = True
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self.stats.disk_bytes += _write_entry(path, arrays)
        self._remember(key, {k: torch.from_numpy(a.copy()) for k, a in arrays.items()})

    def clear_ram(self) -> None:
        self._ram.clear()
        self._ram_used = 0

    # -- internals ----------------------------------------------------------------------------
    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}{_SUFFIX}"

    def _remove(self, path: Path) -> None:
        try:
            size = path.stat().st_size
            path.unlink()
            self.stats.disk_bytes -= size
        except FileNotFoundError:
            pass

    def _remember(self, key: str, feats: Features) -> None:
        if self.ram_bytes <= 0:
            return
        size = sum(v.numel() * v.element_size() for v in feats.values())
        if size > self.ram_bytes:
            return
        if key in self._ram:
            self._ram.move_to_end(key)
            return
        self._ram[key] = feats
        self._ram_used += size
        while self._ram_used > self.ram_bytes:
            _, old = self._ram.popitem(last=False)
            self._ram_used -= sum(v.numel() * v.element_size() for v in old.values())


def _write_entry(path: Path, arrays: Mapping[str, np.ndarray]) -> int:
    """Header (JSON: names, dtypes, shapes, offsets, CRC32 of the payload) then raw bytes."""
    layout, offset, crc = [], 0, 0
    for name, arr in arrays.items():
        layout.append({"name": name, "dtype": arr.dtype.str, "shape": list(arr.shape), "offset": offset})
        offset += arr.nbytes
        crc = zlib.crc32(arr.tobytes(), crc)
    header = json.dumps({"tensors": layout, "payload_bytes": offset, "crc32": crc}).encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC + struct.pack("<Q", len(header)) + header)
            for arr in arrays.values():
                f.write(arr.tobytes())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path.stat().st_size


def _read_entry(path: Path) -> Features:
    with open(path, "rb") as f:
        if f.read(len(_MAGIC)) != _MAGIC:
            raise ValueError("not a feature cache entry (bad magic)")
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    start = len(_MAGIC) + 8 + header_len
    payload = np.memmap(path, dtype=np.uint8, mode="r", offset=start) if header["payload_bytes"] else None
    if payload is None or payload.size != header["payload_bytes"]:
        raise ValueError(f"payload is {0 if payload is None else payload.size} bytes, expected {header['payload_bytes']}")
    if zlib.crc32(payload) != header["crc32"]:
        raise ValueError("checksum mismatch")
    out: Features = {}
    for t in header["tensors"]:
        dtype = np.dtype(t["dtype"])
        count = int(np.prod(t["shape"], dtype=np.int64))
        arr = np.frombuffer(payload, dtype=dtype, count=count, offset=t["offset"]).reshape(t["shape"])
        out[t["name"]] = torch.from_numpy(arr.copy())
    return out
