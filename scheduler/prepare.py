"""Prepare the data: enwik8 (or any other byte corpus) split into train/val/test.

The harness reads exactly four files from the data folder: train.bin, val.bin
and test.bin (the corpus's raw bytes, in order: the first 90%, the next 5%,
the rest; on enwik8 [0, 90M), [90M, 95M), [95M, 100M)) and meta.json (where
the bytes came from, sizes and checksums). This module makes them:

    python -m scheduler prepare                      # download enwik8.zip, verify, split
    python -m scheduler prepare --from enwik8.zip    # a local copy: raw, .zip or .gz
    python -m scheduler prepare --from corpus.bin    # any other byte corpus, split 90/5/5

or from Python: `prepare(Path("data"))`. It is idempotent (a prepared folder
is returned as it is unless force=True) and atomic: everything is built and
verified in a staging folder inside the data folder, then moved into place,
so a failure leaves the previous data byte-identical and no temporary files.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.parse
import zipfile
import zlib
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from scheduler.protocol import WINDOW

ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
ENWIK8_SIZE = 100_000_000
# Published by the corpus's author at http://mattmahoney.net/dc/textdata.html
# (MD5 from GNU md5sum, SHA-1 from SlavaSoft fsum). No SHA-256 is published
# there, so none is checked; the one independent copies agree on, which
# meta.json's "sha256" shows for the real enwik8, is
# 2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8.
ENWIK8_MD5 = "a1fa5ffddb56f4953e226637dabbb36a"
ENWIK8_SHA1 = "57b8363b814821dc9d47aa4d41f58733519076b2"
# enwik8 is a MediaWiki XML dump. A file of enwik8's size that starts otherwise
# (such as a 100,000,000-byte proxy corpus) is another corpus, not a damaged enwik8.
ENWIK8_HEAD = b"<mediawiki "

SPLIT_NAMES = ("train", "val", "test")
SPLIT_FILES = ("train.bin", "val.bin", "test.bin")
META_FILE = "meta.json"
TRAIN_PERCENT = 90
VAL_PERCENT = 5  # test gets the rest
# The smallest corpus whose 5% splits each hold an evaluation window plus one
# byte (the last window's next-byte target): 20_500 * 5 // 100 == WINDOW + 1.
MIN_CORPUS_BYTES = 20_500

CHUNK_BYTES = 1 << 20
DOWNLOAD_TIMEOUT_S = 60  # per socket operation, not for the whole download
PROGRESS_EVERY_S = 5
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # an archive with files; an empty one
GZIP_MAGIC = b"\x1f\x8b"


class PrepareError(Exception):
    """One line: what happened and what to do."""


def split_paths(data_dir: Path) -> dict[str, Path]:
    """Where the harness reads each split: {"train": data_dir/"train.bin", ...}."""
    return {name: Path(data_dir) / file for name, file in zip(SPLIT_NAMES, SPLIT_FILES)}


def is_prepared(data_dir: Path) -> bool:
    """True when meta.json and the three splits are in data_dir, with the sizes meta.json records."""
    return _read_meta(Path(data_dir)) is not None


def prepare(
    data_dir: Path, source: str | Path | None = None, url: str = ENWIK8_URL, force: bool = False
) -> dict:
    """Make data_dir's splits and meta.json, and return the meta.

    source None downloads enwik8 from url; otherwise it is a local file or a
    URL (anything with "://"), raw, zip or gzip (told apart by their first
    bytes). A corpus of enwik8's size must be enwik8 and pass its published
    checksums; any other corpus is split 90/5/5. Raises PrepareError.
    """
    data_dir = Path(data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        with _locked(data_dir):
            meta = None if force else _read_meta(data_dir)
            if meta is not None:
                return meta
            # A prepare killed midway leaves its staging folder behind; under
            # the lock, no other prepare is using one.
            for stale in data_dir.glob(".staging-*"):
                shutil.rmtree(stale, ignore_errors=True)
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=data_dir))
            try:
                meta = _build(staging, source, url)
                _swap_in(staging, data_dir)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except OSError as e:
        raise PrepareError(
            f"could not prepare the data in {data_dir}: {e}. Check the free disk space "
            "(enwik8 needs about 300 MB while preparing) and the permissions, then run prepare again"
        ) from e
    return meta


def _read_meta(data_dir: Path) -> dict | None:
    """meta.json's contents when data_dir holds a complete prepared corpus, else None."""
    try:
        meta = json.loads((data_dir / META_FILE).read_text())
        complete = all(
            path.stat().st_size == meta["splits"][name]["size"]
            for name, path in split_paths(data_dir).items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if complete else None


@contextlib.contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on data_dir, so that two launches never prepare it at once."""
    # The lock is on the folder itself: no lock file to leave behind, and the
    # kernel releases it if the process dies.
    fd = os.open(data_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _build(staging: Path, source: str | Path | None, url: str) -> dict:
    """Write the splits and meta.json into staging, verified; return the meta."""
    if source is None or "://" in str(source):
        origin = url if source is None else str(source)
        name = Path(urllib.parse.urlparse(origin).path).name or "FILE"
        path = staging / "download.part"
        _download(origin, path, name)
    else:
        path = Path(source).expanduser().resolve()
        if not path.is_file():
            raise PrepareError(f"no file at {path}: check the path, or leave out --from to download enwik8")
        origin, name = str(path), path.name
    corpus, fmt, member = _unpack(path, staging, origin)

    # A truncated enwik8 must not pass as a custom corpus: when the name (or
    # the default download) says enwik8, its size must be enwik8's.
    expect_enwik8 = source is None or _is_enwik8_name(name) or _is_enwik8_name(member or "")
    n = corpus.stat().st_size
    if expect_enwik8 and n != ENWIK8_SIZE:
        raise PrepareError(
            f"{origin} should hold enwik8 ({ENWIK8_SIZE:,} bytes) but holds {n:,} bytes: it is "
            f"truncated or damaged. Download enwik8.zip again from {ENWIK8_URL}, or rename the "
            "file if it is another corpus"
        )
    with open(corpus, "rb") as f:
        is_enwik8 = n == ENWIK8_SIZE and (expect_enwik8 or f.read(len(ENWIK8_HEAD)) == ENWIK8_HEAD)
    if not is_enwik8 and n < MIN_CORPUS_BYTES:
        raise PrepareError(
            f"{origin} holds {n:,} bytes, too few: a corpus needs at least {MIN_CORPUS_BYTES:,} so "
            f"that its 5% validation and test splits each hold a {WINDOW}-byte window plus "
            "one. Use a larger file"
        )

    digests, splits = _write_splits(corpus, staging, n, origin)
    if is_enwik8 and (digests["md5"], digests["sha1"]) != (ENWIK8_MD5, ENWIK8_SHA1):
        raise PrepareError(
            f"{origin} has enwik8's size but not its checksum (md5 {digests['md5']}, published "
            f"{ENWIK8_MD5}): it looks like a damaged enwik8. Download enwik8.zip again from {ENWIK8_URL}"
        )
    meta = {
        "corpus": "enwik8" if is_enwik8 else "custom",
        "source": origin,
        "format": fmt,
        "size": n,
        **digests,
        "splits": splits,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with open(staging / META_FILE, "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
        _flush_to_disk(f)
    return meta


def _is_enwik8_name(name: str) -> bool:
    return name.split(".")[0] == "enwik8"


def _download(url: str, dest: Path, name: str) -> None:
    """Stream url into dest, printing progress to stderr every few seconds."""
    # imported here: every command imports this module (through launch's options), few download anything
    import http.client
    import urllib.error
    import urllib.request

    hint = (
        f"Check the network and the address, or download {name} yourself and run: "
        f"python -m scheduler prepare --from {name}"
    )
    print(f"prepare: downloading {url}", file=sys.stderr, flush=True)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(dest, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done, reported = 0, time.monotonic()
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                done += len(chunk)
                if time.monotonic() - reported >= PROGRESS_EVERY_S:
                    of_total = f" of {total / 1e6:.1f} MB ({done / total:.0%})" if total else " MB"
                    print(f"prepare: downloaded {done / 1e6:.1f}{of_total}", file=sys.stderr,
                          flush=True)
                    reported = time.monotonic()
    except urllib.error.HTTPError as e:
        raise PrepareError(f"could not download {url}: HTTP {e.code} {e.reason}. {hint}") from e
    except urllib.error.URLError as e:
        raise PrepareError(f"could not download {url}: {e.reason}. {hint}") from e
    except (http.client.HTTPException, TimeoutError, ConnectionError, ValueError) as e:
        raise PrepareError(f"could not download {url}: {type(e).__name__}: {e}. {hint}") from e
    # urllib returns a short body without complaint when the connection drops.
    if total and done != total:
        raise PrepareError(
            f"could not download {url}: the connection closed after {done:,} of {total:,} bytes. {hint}"
        )


def _unpack(path: Path, staging: Path, origin: str) -> tuple[Path, str, str | None]:
    """The corpus's raw bytes as a file, its format and (for a zip) the member used."""
    with open(path, "rb") as f:
        magic = f.read(4)
    out = staging / "corpus"
    try:
        if magic in ZIP_MAGIC:
            with zipfile.ZipFile(path) as archive:
                member = _pick_member(archive, origin)
                _copy(archive.open(member), out)
            return out, "zip", member.filename
        if magic[:2] == GZIP_MAGIC:
            _copy(gzip.open(path), out)
            return out, "gzip", None
    except (zipfile.BadZipFile, gzip.BadGzipFile, zlib.error, EOFError) as e:
        kind = "zip archive" if magic in ZIP_MAGIC else "gzip file"
        raise PrepareError(
            f"{origin} is not a readable {kind} ({e}): it is damaged or truncated. Download it again"
        ) from e
    return path, "raw", None


def _copy(src: IO[bytes], out: Path) -> None:
    """All of `src` into the file `out`, a chunk at a time; `src` is closed."""
    with src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, CHUNK_BYTES)


def _pick_member(archive: zipfile.ZipFile, origin: str) -> zipfile.ZipInfo:
    """The member named enwik8, else the only file in the archive."""
    files = [info for info in archive.infolist() if not info.is_dir()]
    for info in files:
        if Path(info.filename).name == "enwik8":
            return info
    if len(files) == 1:
        return files[0]
    raise PrepareError(
        f"{origin} should hold one file (or one named enwik8) but holds {len(files)}: "
        "unzip it and pass the file you want with --from"
    )


def _write_splits(corpus: Path, staging: Path, n: int, origin: str) -> tuple[dict[str, str], dict]:
    """Copy the corpus into the three split files in one streaming pass.

    Returns the whole corpus's digests and each split's meta.
    """
    train = n * TRAIN_PERCENT // 100
    val = n * VAL_PERCENT // 100
    whole = {
        "md5": hashlib.md5(usedforsecurity=False),
        "sha1": hashlib.sha1(usedforsecurity=False),
        "sha256": hashlib.sha256(),
    }
    splits, offset = {}, 0
    with open(corpus, "rb") as src:
        for name, file, size in zip(SPLIT_NAMES, SPLIT_FILES, (train, val, n - train - val)):
            digest = hashlib.sha256()
            with open(staging / file, "wb") as dst:
                left = size
                while left:
                    chunk = src.read(min(CHUNK_BYTES, left))
                    if not chunk:
                        raise PrepareError(
                            f"{origin} ended early while being read: was it changed meanwhile? "
                            "Run prepare again"
                        )
                    dst.write(chunk)
                    digest.update(chunk)
                    for h in whole.values():
                        h.update(chunk)
                    left -= len(chunk)
                _flush_to_disk(dst)
            splits[name] = {"file": file, "offset": offset, "size": size, "sha256": digest.hexdigest()}
            offset += size
    return {algo: h.hexdigest() for algo, h in whole.items()}, splits


def _flush_to_disk(f: IO) -> None:
    # Rename-into-place is only atomic after a crash if the data reached the disk first.
    f.flush()
    os.fsync(f.fileno())


def _swap_in(staging: Path, data_dir: Path) -> None:
    """Move the new files from staging into data_dir; on any error, put the old ones back."""
    # meta.json leaves first and arrives last: a reader mid-swap sees "not
    # prepared", never new splits described by the old meta.
    old = staging / "old"
    old.mkdir()
    moved_out, moved_in = [], []
    try:
        for file in (META_FILE, *SPLIT_FILES):
            if (data_dir / file).exists():
                os.replace(data_dir / file, old / file)
                moved_out.append(file)
        for file in (*SPLIT_FILES, META_FILE):
            os.replace(staging / file, data_dir / file)
            moved_in.append(file)
    except OSError:
        for file in moved_in:
            (data_dir / file).unlink()
        for file in moved_out:
            os.replace(old / file, data_dir / file)
        raise
