"""Small helpers shared across the package."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "file_sha256"]

_sha256_seen: dict[tuple[str, int, int], str] = {}


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step.

    A reader never sees a half-written file, and a failure leaves neither a partial ``path``
    nor the temporary file. The temporary name keeps ``path``'s suffixes, so writers that
    choose a format by extension (matplotlib, nibabel) write the right one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix="".join(path.suffixes), dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file (how checkpoints are identified), computed once per (path, size,
    modification time) in a process: an official checkpoint is up to 900 MB."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _sha256_seen:
        h = hashlib.sha256()
        with open(p, "rb") as fp:
            for block in iter(lambda: fp.read(chunk), b""):
                h.update(block)
        _sha256_seen[key] = h.hexdigest()
    return _sha256_seen[key]
