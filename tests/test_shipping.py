"""A node without the data gets it from the driver through Ray's object store, cached by checksum."""

from __future__ import annotations

import json

import pytest

from scheduler.prepare import prepare
from scheduler.trial import local_data, ship_data


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_a_node_without_the_data_fetches_it_once(tmp_path, monkeypatch, ray_local):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"word{i % 89}" for i in range(20_000)))
    data = tmp_path / "data"
    meta = prepare(data, source=corpus)
    shipped = ship_data(data)
    monkeypatch.setenv("SCHEDULER_DATA_CACHE", str(tmp_path / "cache"))
    config = {"data_dir": str(data), "data_sha256": meta["sha256"]}

    assert local_data(config, shipped) == str(data)  # this node has it: no copy
    elsewhere = {**config, "data_dir": str(tmp_path / "not-on-this-node")}
    cached = local_data(elsewhere, shipped)
    assert cached == str(tmp_path / "cache" / meta["sha256"])
    for name in ("train.bin", "val.bin", "test.bin"):  # test: a new baseline's first control run scores it
        assert (tmp_path / "cache" / meta["sha256"] / name).read_bytes() == (data / name).read_bytes()
    assert json.loads((tmp_path / "cache" / meta["sha256"] / "meta.json").read_text())["sha256"] == meta["sha256"]
    assert local_data(elsewhere, None) == cached  # second time: from the cache, nothing fetched

    with pytest.raises(FileNotFoundError, match="none shipped"):
        local_data({**elsewhere, "data_sha256": "other"}, None)
