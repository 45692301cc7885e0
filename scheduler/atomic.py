"""Files replaced whole: a reader sees the old content or the new one, never a part.

    atomic_write(path, data)                 # bytes or text
    with atomic_path(path) as tmp:           # for writers that want a file name (Parquet, safetensors, numpy)
        write_table(table, tmp)

Every file the scheduler writes for others to read goes through here: a
temporary file beside it (a dot-file, so the folder's readers pass over it),
flushed to the disk, then renamed over the old one. The rename alone is atomic
for readers; the flush makes it so after a crash too, since otherwise the rename
can reach the disk before the data and leave an empty file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path | str, fsync: bool = True) -> Iterator[Path]:
    """A temporary path to write; when the block ends it replaces `path` (after an error it is removed instead).

    `fsync=False` is for files rewritten every few seconds whose loss in a crash costs nothing (the next
    rewrite replaces them)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # the pid: two processes never share one
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path | str, data: bytes | str, fsync: bool = True) -> None:
    """Replace `path` by `data` (text is written as UTF-8) so that no reader sees part of it."""
    with atomic_path(path, fsync) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
