"""A node without the data gets it from the driver through Ray's object store, cached by checksum."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from scheduler.prepare import prepare
from scheduler.trial import DATA_NOTE, NODE_DATA_ENV, local_data, ship_data


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

    assert local_data(config, shipped) == (str(data), "")  # this node has it: no copy
    elsewhere = {**config, "data_dir": str(tmp_path / "not-on-this-node")}
    cached, note = local_data(elsewhere, shipped)
    assert cached == str(tmp_path / "cache" / meta["sha256"]) and note.startswith(DATA_NOTE)
    for name in ("train.bin", "val.bin", "test.bin"):  # test: a new baseline's first control run scores it
        assert (tmp_path / "cache" / meta["sha256"] / name).read_bytes() == (data / name).read_bytes()
    assert json.loads((tmp_path / "cache" / meta["sha256"] / "meta.json").read_text())["sha256"] == meta["sha256"]
    assert local_data(elsewhere, None) == (cached, "")  # second time: from the cache, nothing fetched

    with pytest.raises(FileNotFoundError, match="none shipped"):
        local_data({**elsewhere, "data_sha256": "other"}, None)


@pytest.mark.slow
def test_a_node_with_a_data_folder_of_its_own_reads_it_or_its_cache(tmp_path, monkeypatch, ray_local):
    """SCHEDULER_DATA_DIR, set where a node is started, replaces the launch's data path on that node: used when it
    holds the corpus, else the node's cache is filled, though the launch's path holds the data here."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"word{i % 83}" for i in range(20_000)))
    launch_data = tmp_path / "launch-data"
    meta = prepare(launch_data, source=corpus)
    own = tmp_path / "own-data"
    monkeypatch.setenv("SCHEDULER_DATA_CACHE", str(tmp_path / "cache"))
    config = {"data_dir": str(launch_data), "data_sha256": meta["sha256"]}

    monkeypatch.setenv(NODE_DATA_ENV, str(own))  # nothing there: fetched into the cache
    assert local_data(config, ship_data(launch_data))[0] == str(tmp_path / "cache" / meta["sha256"])
    prepare(own, source=corpus)  # a copy of its own: used as it is
    assert local_data(config, None) == (str(own), "")


@pytest.mark.slow
def test_trials_starting_together_on_a_node_fetch_the_data_once(tmp_path, monkeypatch, ray_local):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"word{i % 79}" for i in range(20_000)))
    meta = prepare(tmp_path / "data", source=corpus)
    shipped = ship_data(tmp_path / "data")
    monkeypatch.setenv("SCHEDULER_DATA_CACHE", str(tmp_path / "cache"))
    config = {"data_dir": str(tmp_path / "elsewhere"), "data_sha256": meta["sha256"]}

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: local_data(config, shipped), range(4)))
    assert {folder for folder, _ in answers} == {str(tmp_path / "cache" / meta["sha256"])}
    assert sum(bool(note) for _, note in answers) == 1  # one fetched; the others waited for its copy
    for name in ("train.bin", "val.bin", "test.bin"):
        assert (tmp_path / "cache" / meta["sha256"] / name).read_bytes() == (tmp_path / "data" / name).read_bytes()
