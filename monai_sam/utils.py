"""Small helpers shared across the package."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "file_sha256", "replace_marked_block", "write_text_atomic"]

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


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file in one step (`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def replace_marked_block(path: str | os.PathLike, begin: str, end: str, body: str, new_section: str) -> Path:
    """Put ``body`` between the ``begin`` / ``end`` marker lines of a Markdown file, atomically.

    What lies outside the markers is kept. The first time (no markers yet), ``new_section``
    (a heading and its introduction) and the marked block are appended.
    """
    path = Path(path)
    text = path.read_text() if path.exists() else "# Results\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n{new_section.rstrip()}\n\n{block}\n"
    return write_text_atomic(path, text)
