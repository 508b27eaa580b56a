"""The shared store under concurrent writers: other processes' staging survives, replacements are atomic."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

from deltaserve.experts import store as store_module
from deltaserve.experts.store import ExpertStore
from deltaserve.experts.versions import RETIRED_DIR


def test_opening_a_store_keeps_live_staging_and_removes_dead_staging(micro_zoo, tmp_path):
    root = tmp_path / "store"
    ExpertStore(root, micro_zoo.layout.base)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        live = root / f".staging-{sleeper.pid}-abc"
        gone = root / f".staging-{dead.pid}-def"
        for path in (live, gone):
            path.mkdir()
            (path / "partial").write_bytes(b"x")
        ExpertStore(root, micro_zoo.layout.base)          # another replica opening the store
        assert live.is_dir() and not gone.exists()
    finally:
        sleeper.kill()


def test_two_processes_register_into_one_store_at_once(micro_zoo, tmp_path):
    store = tmp_path / "store"
    ExpertStore(store, micro_zoo.layout.base)
    cmds = [[sys.executable, "-m", "deltaserve.server.cli", "store", "add", "--store", str(store), "--base",
             str(micro_zoo.layout.base), "--name", f"{task.replace('_', '-')}-lora", "--source",
             str(micro_zoo.layout.lora(task))] for task in ("upper", "length", "count_vowels", "max_digit")]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    results = [(p.wait(120), p.stderr.read()) for p in procs]
    assert [code for code, _ in results] == [0] * len(cmds), results
    s = ExpertStore(store, micro_zoo.layout.base)
    assert s.names() == ["count-vowels-lora", "length-lora", "max-digit-lora", "upper-lora"]
    assert s.generation() == len(cmds)


def test_concurrent_replacements_never_leave_the_name_missing(micro_zoo, tmp_path):
    store = ExpertStore(tmp_path / "store", micro_zoo.layout.base)
    sources = [micro_zoo.layout.lora("upper"), micro_zoo.layout.lora("length")]
    store.import_source("hot", sources[0])
    missing, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            if "hot" not in store.names():
                missing.append(1)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    writers = [threading.Thread(target=store.import_source, args=("hot", sources[i % 2]), kwargs={"replace": True})
               for i in range(8)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in threads:
        t.join()
    assert not missing
    retired = list((store.root / RETIRED_DIR).iterdir())
    assert retired and all(p.name.startswith("hot@") for p in retired)
    for path in retired:      # a replaced version is still found by its digest (for requests in flight)
        digest = json.loads((path / "manifest.json").read_text())["sha256"]["tensors.safetensors"]
        found = store.version_dir("hot", digest)   # the current folder or a retired copy of that version
        assert found == store.path("hot") or (found.parent == path.parent
                                              and found.name.split(".")[0] == path.name.split(".")[0])


def test_a_version_between_swap_and_retirement_is_still_found(micro_zoo, tmp_path, monkeypatch):
    """A replacement swaps the new version in, then moves the old one to .retired/: in between, the old
    version is in neither place. A reader looking for it then (the chaos test's 404 on a replace racing
    replaces) waits for the store's lock and finds it retired."""
    store = ExpertStore(tmp_path / "store", micro_zoo.layout.base)
    store.import_source("hot", micro_zoo.layout.lora("upper"))
    old = store.load("hot").manifest.sha256["tensors.safetensors"]
    swapped, release, retire = threading.Event(), threading.Event(), store_module.retire

    def slow_retire(root, path, name):
        swapped.set()
        assert release.wait(30)
        retire(root, path, name)

    monkeypatch.setattr(store_module, "retire", slow_retire)
    writer = threading.Thread(target=store.import_source, args=("hot", micro_zoo.layout.lora("length")),
                              kwargs={"replace": True})
    writer.start()
    assert swapped.wait(60)
    found: list = []
    reader = threading.Thread(target=lambda: found.append(store.load_version("hot", old)))
    reader.start()
    reader.join(0.5)
    assert reader.is_alive()       # waiting for the lock the replacement holds, not failing
    release.set()
    writer.join()
    reader.join(30)
    assert found and found[0].manifest.sha256["tensors.safetensors"] == old
    found[0].check_digests()


def test_loading_the_current_version_never_mixes_two_versions(micro_zoo, tmp_path):
    """``load(digests=True)`` while replacements land reads one version's manifest and tensors (the
    engine's store scan dropped a replaced expert as 'broken' when it read them from two versions)."""
    store = ExpertStore(tmp_path / "store", micro_zoo.layout.base)
    sources = [micro_zoo.layout.lora("upper"), micro_zoo.layout.lora("length")]
    store.import_source("hot", sources[0])
    errors, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                store.load("hot", digests=True)
            except Exception as err:  # noqa: BLE001 - collected and reported by the assertion
                errors.append(repr(err))

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    for i in range(12):
        store.import_source("hot", sources[(i + 1) % 2], replace=True)
    stop.set()
    for t in readers:
        t.join()
    assert not errors, errors[:3]


def test_a_reader_of_a_read_only_store_needs_no_lock(micro_zoo, tmp_path, monkeypatch):
    """A replica with the store mounted read-only: a lookup that misses asks again without the lock (it
    cannot open .lock, and nobody can write that store), and a missing expert is still a clean 'unknown'."""
    import builtins
    import errno

    import pytest

    import deltaserve.experts.store
    from deltaserve.experts.store import LOCK_FILE, UnknownExpertError

    store = ExpertStore(tmp_path / "store", micro_zoo.layout.base)
    store.import_source("upper-lora", micro_zoo.layout.lora("upper"))

    def read_only_open(path, *args, **kwargs):
        if str(path).endswith(LOCK_FILE):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(deltaserve.experts.store, "open", read_only_open, raising=False)
    assert store.load("upper-lora").manifest.name == "upper-lora"
    with pytest.raises(UnknownExpertError):
        store.load("no-such-expert")
    with pytest.raises(OSError, match="Read-only"):           # a writer still needs the lock
        store.import_source("length-lora", micro_zoo.layout.lora("length"))
