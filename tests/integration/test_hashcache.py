"""Model files are hashed once per start, and a changed file is always hashed again."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from app.pipeline import hashcache
from app.pipeline.hashcache import HashCache


def later() -> float:
    """A clock far enough ahead that files written by the test are not racy."""
    return time.time() + 10 * hashcache.RACY_S


@pytest.fixture()
def reads(monkeypatch):
    """Count the files actually read to be hashed."""
    seen: list[Path] = []
    real = hashcache.file_sha256

    def counting(path: Path) -> str:
        seen.append(Path(path))
        return real(path)

    monkeypatch.setattr(hashcache, "file_sha256", counting)
    return seen


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_an_unchanged_file_is_read_once(tmp_path, reads):
    path = tmp_path / "unet.safetensors"
    path.write_bytes(b"weights" * 1000)
    cache = HashCache(clock=later)
    assert [cache.sha256(path) for _ in range(3)] == [sha(b"weights" * 1000)] * 3
    assert reads == [path] and cache.hashed_bytes == 7000


def test_a_link_and_its_target_share_one_read(tmp_path, reads):
    blob = tmp_path / "blob"
    blob.write_bytes(b"x" * 10)
    (tmp_path / "view").symlink_to(blob)  # the hub's view folders link to the cache's blobs
    cache = HashCache(clock=later)
    assert cache.sha256(blob) == cache.sha256(tmp_path / "view")
    assert reads == [blob]


def test_a_file_grown_or_replaced_is_read_again(tmp_path, reads):
    path = tmp_path / "vae.safetensors"
    path.write_bytes(b"a" * 100)
    cache = HashCache(clock=later)
    cache.sha256(path)
    with path.open("ab") as handle:  # appended: another size
        handle.write(b"b")
    assert cache.sha256(path) == sha(b"a" * 100 + b"b")
    replacement = tmp_path / "new"
    replacement.write_bytes(b"c" * 101)
    os.replace(replacement, path)  # same size, another inode
    assert cache.sha256(path) == sha(b"c" * 101)
    assert len(reads) == 3


def test_a_file_rewritten_in_place_with_the_same_size_is_read_again(tmp_path, reads):
    path = tmp_path / "text_encoder.safetensors"
    path.write_bytes(b"1" * 64)
    cache = HashCache(clock=later)
    cache.sha256(path)
    before = os.stat(path).st_ctime_ns
    deadline = time.monotonic() + 5
    while os.stat(path).st_ctime_ns == before:  # a rewrite in the same timestamp tick leaves ctime; wait it out
        assert time.monotonic() < deadline, "ctime never changed"
        with path.open("r+b") as handle:
            handle.write(b"2" * 64)
    assert cache.sha256(path) == sha(b"2" * 64)
    assert len(reads) == 2


def test_a_recently_changed_file_is_never_cached(tmp_path, reads):
    # With the real clock a file written just now is racy: a change within the same tick would keep its key.
    path = tmp_path / "model_index.json"
    path.write_bytes(b"{}")
    cache = HashCache()
    cache.sha256(path)
    cache.sha256(path)
    assert len(reads) == 2


def test_loading_the_tiny_model_hashes_each_file_once(monkeypatch, registry, tmp_path, reads):
    from app.pipeline.loader import load_model, model_files, resolve_paths

    monkeypatch.setattr(hashcache, "CACHE", HashCache(clock=later))
    entry = registry.get("sameseed-tiny")
    paths = resolve_paths(entry, registry, tmp_path, allow_download=False)
    loaded = load_model(entry, paths, "cpu")
    files = model_files(entry, paths)
    assert sorted(reads) == sorted(files.values())  # verified before loading, checked after: one read each
    assert loaded.files == entry.sha256


def test_a_file_being_hashed_is_not_read_again_by_another_thread(tmp_path, monkeypatch):
    import threading

    path = tmp_path / "unet.safetensors"
    path.write_bytes(b"w" * 1000)
    entered, release, reads = threading.Event(), threading.Event(), []
    real = hashcache.file_sha256

    def slow(p: Path) -> str:
        reads.append(p)
        entered.set()
        assert release.wait(10)
        return real(p)

    monkeypatch.setattr(hashcache, "file_sha256", slow)
    cache = HashCache(clock=later)
    results: list[str] = []
    first = threading.Thread(target=lambda: results.append(cache.sha256(path)))
    first.start()
    assert entered.wait(10)
    second = threading.Thread(target=lambda: results.append(cache.sha256(path)))
    second.start()
    release.set()
    first.join(10)
    second.join(10)
    assert results == [sha(b"w" * 1000)] * 2 and reads == [path]


def test_the_prehash_covers_preloaded_local_models_and_neither_downloads_nor_builds(registry, tmp_path):
    from app.pipeline.loader import model_files, resolve_paths
    from app.settings import EMBEDDED_REGISTRY
    from app.worker.messages import WorkerConfig
    from app.worker.prehash import files_to_prehash, start_prehash

    def config(*preload: str, registry_path: Path = EMBEDDED_REGISTRY) -> WorkerConfig:
        return WorkerConfig(worker_id="w0", device="cpu", cpu_threads=1, cpu_mkldnn=True,
                            registry_path=registry_path, data_dir=tmp_path, preload=preload, allow_download=False)

    tiny = registry.get("sameseed-tiny")
    expected = sorted(model_files(tiny, resolve_paths(tiny, registry, tmp_path, False)).values())
    assert sorted(files_to_prehash(config("sameseed-tiny", "sameseed-bench"))) == expected
    assert not (tmp_path / "models" / "sameseed-bench").exists()  # the builtin was not built for it
    assert start_prehash(config("sameseed-tiny", registry_path=tmp_path / "missing.yaml")) is None
