"""Tests for scheduler.prepare: python -m pytest tests/test_prepare.py -q

No network and no real enwik8: the tests make their own corpora and point
the module's enwik8 size and checksums at a small generated "enwik8".
"""

import gzip
import hashlib
import http.server
import io
import os
import random
import shutil
import socket
import threading
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from scheduler import prepare as P
from scheduler.protocol import WINDOW

FAKE_ENWIK8_SIZE = 40_000  # splits 36_000 / 2_000 / 2_000
GENERIC_SIZE = 30_001  # splits 27_000 / 1_500 / 1_501


def corpus_bytes(n: int, seed: int, head: bytes = b"") -> bytes:
    return (head + random.Random(seed).randbytes(n))[:n]


def zip_bytes(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under folder (hidden ones too) with its bytes: equal snapshots mean nothing changed."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


def read_splits(data_dir: Path) -> list[bytes]:
    return [path.read_bytes() for path in P.split_paths(data_dir).values()]


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    # urllib honours proxy variables; the local test server must be reached directly.
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def enwik8(monkeypatch) -> bytes:
    """A small stand-in for enwik8, made the one the module recognises."""
    data = corpus_bytes(FAKE_ENWIK8_SIZE, seed=8, head=P.ENWIK8_HEAD)
    monkeypatch.setattr(P, "ENWIK8_SIZE", len(data))
    monkeypatch.setattr(P, "ENWIK8_MD5", hashlib.md5(data).hexdigest())
    monkeypatch.setattr(P, "ENWIK8_SHA1", hashlib.sha1(data).hexdigest())
    return data


@pytest.fixture
def src(tmp_path) -> Path:
    folder = tmp_path / "src"
    folder.mkdir()
    return folder


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www, recording the paths it was asked for."""
    root = tmp_path / "www"
    root.mkdir()
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # A short poll interval: shutdown() waits for one, and every bad-case test starts a server.
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
    yield SimpleNamespace(root=root, url=f"http://127.0.0.1:{httpd.server_port}", hits=hits)
    httpd.shutdown()
    httpd.server_close()


def check_enwik8_splits(data_dir: Path, data: bytes, meta: dict) -> None:
    assert read_splits(data_dir) == [data[:36_000], data[36_000:38_000], data[38_000:]]
    assert meta["corpus"] == "enwik8"
    assert meta["size"] == len(data)
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()
    assert P._read_meta(data_dir) == meta
    assert P.is_prepared(data_dir)


# --- good sources -----------------------------------------------------------


def test_raw_enwik8(enwik8, src, data_dir):
    (src / "enwik8").write_bytes(enwik8)
    meta = P.prepare(data_dir, source=str(src / "enwik8"))
    check_enwik8_splits(data_dir, enwik8, meta)
    assert meta["format"] == "raw" and meta["source"] == str(src / "enwik8")
    assert [meta["splits"][k]["offset"] for k in P.SPLIT_NAMES] == [0, 36_000, 38_000]
    for name, path in P.split_paths(data_dir).items():
        assert meta["splits"][name]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sorted(os.listdir(data_dir)) == sorted([*P.SPLIT_FILES, P.META_FILE])


@pytest.mark.parametrize(
    "name, fmt",
    [("enwik8.zip", "zip"), ("enwik8.gz", "gzip"), ("no-extension", "zip"), ("packed.txt", "gzip")],
)
def test_compressed_enwik8_is_detected_by_magic(enwik8, src, data_dir, name, fmt):
    packed = zip_bytes({"enwik8": enwik8}) if fmt == "zip" else gzip.compress(enwik8)
    (src / name).write_bytes(packed)
    meta = P.prepare(data_dir, source=src / name)
    check_enwik8_splits(data_dir, enwik8, meta)
    assert meta["format"] == fmt


def test_generic_corpus_splits_90_5_5(src, data_dir):
    data = corpus_bytes(GENERIC_SIZE, seed=1)
    (src / "corpus.bin").write_bytes(data)
    meta = P.prepare(data_dir, source=str(src / "corpus.bin"))
    assert read_splits(data_dir) == [data[:27_000], data[27_000:28_500], data[28_500:]]
    assert [meta["splits"][k]["size"] for k in P.SPLIT_NAMES] == [27_000, 1_500, 1_501]
    assert meta["corpus"] == "custom" and meta["size"] == GENERIC_SIZE
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()


def test_smallest_corpus_fits_a_window_in_each_split(src, data_dir):
    (src / "small.bin").write_bytes(corpus_bytes(P.MIN_CORPUS_BYTES, seed=2))
    meta = P.prepare(data_dir, source=str(src / "small.bin"))
    assert min(s["size"] for s in meta["splits"].values()) == WINDOW + 1


def test_enwik8_sized_corpus_of_other_text_is_custom(enwik8, src, data_dir):
    # Like the 100 MB proxy corpus: enwik8's size, but not a MediaWiki dump and not named enwik8.
    data = corpus_bytes(len(enwik8), seed=3, head=b"Python manual ")
    (src / "proxy.bin").write_bytes(data)
    meta = P.prepare(data_dir, source=str(src / "proxy.bin"))
    assert meta["corpus"] == "custom"
    assert read_splits(data_dir) == [data[:36_000], data[36_000:38_000], data[38_000:]]


def test_download_over_http(enwik8, server, data_dir):
    (server.root / "enwik8.zip").write_bytes(zip_bytes({"enwik8": enwik8}))
    meta = P.prepare(data_dir, url=f"{server.url}/enwik8.zip")
    check_enwik8_splits(data_dir, enwik8, meta)
    assert meta["source"] == f"{server.url}/enwik8.zip"
    assert server.hits == ["/enwik8.zip"]


def test_source_url_of_generic_gzip(server, data_dir):
    data = corpus_bytes(GENERIC_SIZE, seed=4)
    (server.root / "blob").write_bytes(gzip.compress(data))
    meta = P.prepare(data_dir, source=f"{server.url}/blob")
    assert meta["corpus"] == "custom" and meta["format"] == "gzip"
    assert b"".join(read_splits(data_dir)) == data


def test_download_over_file_url(enwik8, src, data_dir):
    (src / "enwik8.zip").write_bytes(zip_bytes({"enwik8": enwik8}))
    meta = P.prepare(data_dir, url=(src / "enwik8.zip").as_uri())
    check_enwik8_splits(data_dir, enwik8, meta)


# --- idempotence, force, state ---------------------------------------------


def test_second_prepare_does_no_work(enwik8, server, data_dir):
    (server.root / "enwik8.zip").write_bytes(zip_bytes({"enwik8": enwik8}))
    url = f"{server.url}/enwik8.zip"
    first = P.prepare(data_dir, url=url)
    before = {p: p.stat().st_mtime_ns for p in data_dir.iterdir()}
    assert P.prepare(data_dir, url=url) == first
    assert P.prepare(data_dir, source="/no/such/file") == first  # the source is not even looked at
    assert server.hits == ["/enwik8.zip"]
    assert {p: p.stat().st_mtime_ns for p in data_dir.iterdir()} == before


def test_force_replaces_and_truncated_split_is_redone(src, data_dir):
    old, new = corpus_bytes(GENERIC_SIZE, seed=5), corpus_bytes(GENERIC_SIZE + 7, seed=6)
    (src / "old.bin").write_bytes(old)
    (src / "new.bin").write_bytes(new)
    assert not P.is_prepared(data_dir)
    P.prepare(data_dir, source=str(src / "old.bin"))
    meta = P.prepare(data_dir, source=str(src / "new.bin"), force=True)
    assert meta["size"] == len(new) and b"".join(read_splits(data_dir)) == new

    P.split_paths(data_dir)["train"].write_bytes(b"half")
    assert not P.is_prepared(data_dir)
    P.prepare(data_dir, source=str(src / "old.bin"))
    assert b"".join(read_splits(data_dir)) == old


def test_stale_staging_folder_is_removed(src, data_dir):
    (data_dir / ".staging-killed").mkdir(parents=True)
    (data_dir / ".staging-killed" / "download.part").write_bytes(b"x" * 100)
    (src / "corpus.bin").write_bytes(corpus_bytes(GENERIC_SIZE, seed=7))
    P.prepare(data_dir, source=str(src / "corpus.bin"))
    assert sorted(os.listdir(data_dir)) == sorted([*P.SPLIT_FILES, P.META_FILE])


def test_split_paths(tmp_path):
    assert P.split_paths(tmp_path) == {
        "train": tmp_path / "train.bin",
        "val": tmp_path / "val.bin",
        "test": tmp_path / "test.bin",
    }


# --- failures: PrepareError, nothing left behind, old data untouched --------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flip_byte(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def bad_source(case: str, enwik8: bytes, src: Path, server) -> tuple[dict, str]:
    """prepare()'s keyword arguments for a bad case, and a phrase its error must contain."""
    def put(name: str, data: bytes) -> str:
        (src / name).write_bytes(data)
        return str(src / name)

    if case == "enwik8 zip of wrong size":
        return {"source": put("enwik8.zip", zip_bytes({"enwik8": enwik8[:-1]}))}, "truncated or damaged"
    if case == "enwik8 download of wrong size":
        (server.root / "enwik8.zip").write_bytes(zip_bytes({"enwik8": enwik8 + b"x"}))
        return {"url": f"{server.url}/enwik8.zip"}, "truncated or damaged"
    if case == "raw enwik8 with bad checksum":
        return {"source": put("enwik8", flip_byte(enwik8, 20_000))}, "damaged enwik8"
    if case == "renamed enwik8 with bad checksum":
        return {"source": put("wiki.xml", flip_byte(enwik8, 20_000))}, "damaged enwik8"
    if case == "truncated zip":
        return {"source": put("enwik8.zip", zip_bytes({"enwik8": enwik8})[:-100])}, "not a readable zip"
    if case == "zip with bad crc":
        packed = zip_bytes({"enwik8": enwik8}, zipfile.ZIP_STORED)
        return {"source": put("enwik8.zip", flip_byte(packed, 1_000))}, "not a readable zip"
    if case == "zip of several files":
        return {"source": put("two.zip", zip_bytes({"a": enwik8, "b": enwik8}))}, "holds 2"
    if case == "truncated gz":
        return {"source": put("enwik8.gz", gzip.compress(enwik8)[:-100])}, "not a readable gzip"
    if case == "gz with bad data":
        return {"source": put("enwik8.gz", flip_byte(gzip.compress(enwik8), 1_000))}, "not a readable gzip"
    if case == "unreachable url":
        return {"url": f"http://127.0.0.1:{closed_port()}/enwik8.zip"}, "could not download"
    if case == "http 404":
        return {"source": f"{server.url}/missing.zip"}, "HTTP 404"
    if case == "missing file url":
        return {"url": (src / "missing.zip").as_uri()}, "could not download"
    if case == "missing local file":
        return {"source": str(src / "missing.bin")}, "no file at"
    if case == "too small corpus":
        return {"source": put("tiny.bin", corpus_bytes(P.MIN_CORPUS_BYTES - 1, seed=9))}, "too few"
    raise ValueError(case)


BAD_CASES = [
    "enwik8 zip of wrong size", "enwik8 download of wrong size", "raw enwik8 with bad checksum",
    "renamed enwik8 with bad checksum", "truncated zip", "zip with bad crc", "zip of several files",
    "truncated gz", "gz with bad data", "unreachable url", "http 404", "missing file url",
    "missing local file", "too small corpus",
]


@pytest.mark.parametrize("already_prepared", [False, True], ids=["empty", "prepared"])
@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_source(case, already_prepared, enwik8, src, data_dir, server):
    if already_prepared:
        (src / "good.bin").write_bytes(corpus_bytes(GENERIC_SIZE, seed=10))
        P.prepare(data_dir, source=str(src / "good.bin"))
    else:
        data_dir.mkdir()
    before = snapshot(data_dir)
    kwargs, phrase = bad_source(case, enwik8, src, server)
    with pytest.raises(P.PrepareError) as error:
        P.prepare(data_dir, force=True, **kwargs)
    message = str(error.value)
    assert phrase in message and "\n" not in message
    assert snapshot(data_dir) == before
    assert P.is_prepared(data_dir) == already_prepared


def test_failure_while_swapping_restores_old_data(monkeypatch, src, data_dir):
    (src / "old.bin").write_bytes(corpus_bytes(GENERIC_SIZE, seed=11))
    (src / "new.bin").write_bytes(corpus_bytes(GENERIC_SIZE, seed=12))
    P.prepare(data_dir, source=str(src / "old.bin"))
    before = snapshot(data_dir)
    replace = os.replace

    def fail_moving_in_val(a, b):
        if Path(a).parent.name.startswith(".staging-") and Path(b).name == "val.bin":
            raise OSError(28, "No space left on device")
        replace(a, b)

    monkeypatch.setattr(os, "replace", fail_moving_in_val)
    with pytest.raises(P.PrepareError, match="No space left on device.*free disk space"):
        P.prepare(data_dir, source=str(src / "new.bin"), force=True)
    assert snapshot(data_dir) == before


def test_disk_full_while_unpacking(monkeypatch, enwik8, src, data_dir):
    (src / "enwik8.zip").write_bytes(zip_bytes({"enwik8": enwik8}))

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", disk_full)
    with pytest.raises(P.PrepareError, match="free disk space"):
        P.prepare(data_dir, source=str(src / "enwik8.zip"))
    assert snapshot(data_dir) == {}
