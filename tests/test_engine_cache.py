"""The engine cache every compiled-model backend shares (sdrt.cache.EngineCache): content keys, whole entries,
altered bytes caught, eviction of its own entries only, budgets from the environment, concurrent writers and
folders that cannot be written."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import sdrt.bundle
import sdrt.cache
from sdrt.cache import EngineCache, cache_budget
from sdrt.errors import ConfigError

MB = 2**20


def write(data: bytes):
    """A `produce` callback writing `data` as a single-file payload."""
    return lambda path: path.write_bytes(data)


def write_folder(files: dict[str, bytes]):
    """A `produce` callback writing a folder payload (as Core ML's .mlmodelc)."""

    def produce(path: Path) -> None:
        for name, data in files.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_bytes(data)

    return produce


@pytest.fixture
def cache(tmp_path):
    return EngineCache(tmp_path / "cache", max_bytes=10 * MB)


def test_keys_follow_every_part_of_the_identity():
    identity = {"model": {"unet/model.onnx": "ab" * 32}, "shapes": {"sample": [2, 4, 8, 8]}, "engine": "x 1.0"}
    key = EngineCache.key(identity)
    assert len(key) == 40 and key == EngineCache.key(dict(reversed(identity.items())))  # order does not matter
    for part, other in (("model", {"unet/model.onnx": "cd" * 32}), ("shapes", {"sample": [2, 4, 8, 16]}),
                        ("engine", "x 1.1")):
        assert EngineCache.key({**identity, part: other}) != key


def test_store_then_lookup_file_and_folder_payloads(cache):
    blob = cache.store("a" * 40, "model.blob", write(b"compiled"))
    assert blob == cache.root / f"{'a' * 40}.entry" / "model.blob" and blob.read_bytes() == b"compiled"
    folder = cache.store("b" * 40, "model.mlmodelc", write_folder({"coremldata.bin": b"1", "weights/w.bin": b"2"}))
    assert (folder / "weights" / "w.bin").read_bytes() == b"2"
    assert cache.lookup("a" * 40) == blob and cache.lookup("b" * 40) == folder
    assert cache.lookup("c" * 40) is None
    assert not list(cache.root.glob(".*staging*"))  # nothing left from staging


def test_a_failing_build_leaves_nothing(cache):
    def broken(path):
        path.write_bytes(b"half")
        raise RuntimeError("compiler crashed")

    with pytest.raises(RuntimeError, match="compiler crashed"):
        cache.store("a" * 40, "model.blob", broken)
    assert list(cache.root.iterdir()) == []


@pytest.mark.parametrize("damage", ["same size, same mtime", "truncated", "folder file changed", "link"])
def test_altered_bytes_are_never_used(cache, damage, caplog):
    key = "d" * 40
    if damage == "folder file changed":
        payload = cache.store(key, "m.mlmodelc", write_folder({"a.bin": b"A" * 100, "b.bin": b"B" * 100}))
        target = payload / "b.bin"
    else:
        payload = target = cache.store(key, "model.blob", write(b"A" * 1000))
    st = target.stat()
    if damage == "truncated":
        target.write_bytes(b"A" * 10)
    elif damage == "link":
        target.unlink()
        (cache.root / "elsewhere").write_bytes(b"A" * 1000)
        target.symlink_to(cache.root / "elsewhere")
    else:
        target.write_bytes(b"A" * 99 + b"X" + target.read_bytes()[100:])
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # only ctime (and the bytes) tell
    assert cache.lookup(key) is None
    assert "does not match its recorded checksum" in caplog.text
    assert not payload.parent.exists()  # removed, so the next store rebuilds it
    assert (cache.root / "elsewhere").exists() if damage == "link" else True  # the link's target is left alone


def test_same_bytes_with_a_new_signature_are_hashed_then_trusted(cache, monkeypatch):
    key = "e" * 40
    blob = cache.store(key, "model.blob", write(b"B" * 1000))
    copy = blob.with_name("copy")
    shutil.copy2(blob, copy)
    os.replace(copy, blob)  # same bytes, another inode: hashed again, found intact
    hashed = []
    monkeypatch.setattr(sdrt.cache, "_tree_sha256", lambda payload, files: hashed.append(1) or
                        sdrt.bundle.sha256_file(payload))
    monkeypatch.setattr(sdrt.cache, "SETTLE_S", 0.0)
    assert cache.lookup(key) == blob and len(hashed) == 1
    assert cache.lookup(key) == blob and len(hashed) == 1  # the new signature was recorded: no second read


def test_eviction_drops_least_recently_used_own_entries_only(tmp_path):
    cache = EngineCache(tmp_path / "cache", max_bytes=int(2.5 * MB))
    cache.root.mkdir()
    user_file = cache.root / "notes.txt"
    user_file.write_text("mine")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"x" * 3 * MB)
    (cache.root / ("f" * 40 + ".entry")).symlink_to(outside)  # a link named like an entry: never followed
    fake = cache.root / ("9" * 40 + ".entry")  # named like an entry, but sdrt did not write it (no record)
    fake.mkdir()
    (fake / "data").write_bytes(b"y" * MB)
    keys = ["1" * 40, "2" * 40, "3" * 40]
    for key in keys[:2]:
        cache.store(key, "model.blob", write(b"z" * MB))
        time.sleep(0.02)
    assert cache.lookup(keys[0])  # used: now the most recent
    time.sleep(0.02)
    cache.store(keys[2], "model.blob", write(b"z" * MB))
    assert [cache.lookup(k) is not None for k in keys] == [True, False, True]
    assert user_file.read_text() == "mine" and (outside / "precious").exists() and (fake / "data").exists()


def test_stale_staging_folders_of_killed_processes_are_removed(cache, monkeypatch):
    cache.root.mkdir()
    stale, fresh = cache.root / f".{'a' * 40}.staging-x1", cache.root / f".{'b' * 40}.staging-x2"
    for folder in (stale, fresh):
        folder.mkdir()
    old = time.time() - 2 * sdrt.cache.STALE_STAGING_S
    os.utime(stale, (old, old))
    cache.store("c" * 40, "model.blob", write(b"x"))
    assert not stale.exists() and fresh.exists()  # a fresh one may belong to a process still writing


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "ten", "1e400"])
def test_budgets_from_the_environment_are_validated(monkeypatch, value):
    monkeypatch.setenv("SDRT_TEST_CACHE_GB", value)
    with pytest.raises(ConfigError, match=r"SDRT_TEST_CACHE_GB must be a size in GB \(a number >= 0\), got"):
        EngineCache.for_engine("test")


def test_budget_defaults_and_values(monkeypatch):
    monkeypatch.delenv("SDRT_TEST_CACHE_GB", raising=False)
    assert cache_budget("SDRT_TEST_CACHE_GB", 2.0) == 2 * 2**30
    monkeypatch.setenv("SDRT_TEST_CACHE_GB", "0.5")
    assert cache_budget("SDRT_TEST_CACHE_GB", 2.0) == 2**29


CONCURRENT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from sdrt.cache import EngineCache
    cache = EngineCache(Path(sys.argv[1]), 2**30)
    start = float(sys.argv[2])
    def produce(path):
        time.sleep(max(0.0, start - time.time()))
        path.write_bytes(sys.argv[3].encode() * 2**20)
    payload = cache.store("a" * 40, "model.blob", produce)
    print(payload.read_bytes()[:1].decode())
""")


def test_two_processes_filling_one_entry_leave_one_whole_entry(tmp_path):
    start = time.time() + 1.5
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(tmp_path / "c"), str(start), letter],
                              stdout=subprocess.PIPE, text=True) for letter in "XY"]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    entries = list((tmp_path / "c").iterdir())
    assert [e.name for e in entries] == ["a" * 40 + ".entry"]
    data = (entries[0] / "model.blob").read_bytes()
    assert data in (b"X" * 2**20, b"Y" * 2**20)  # one writer's whole payload, never a mix
    assert outs == [data[:1].decode()] * 2  # both processes read the entry that won
    record = json.loads((entries[0] / "record.json").read_text())
    assert record["bytes"] == 2**20


READ_ONLY = textwrap.dedent("""
    import logging, sys
    from pathlib import Path
    from sdrt.cache import EngineCache
    logging.basicConfig(level=logging.WARNING)
    cache = EngineCache(Path(sys.argv[1]), 2**30)
    assert cache.lookup("b" * 40) is None  # damaged, and cannot be removed: skipped
    assert cache.store("c" * 40, "model.blob", lambda p: p.write_bytes(b"x")) is None
    assert cache.lookup("a" * 40).read_bytes() == b"good"  # intact entries are still used
    print("OK")
""")


def test_a_read_only_cache_folder_costs_warnings_not_failures(tmp_path):
    cache = EngineCache(tmp_path / "c", 2**30)
    cache.store("a" * 40, "model.blob", write(b"good"))
    damaged = cache.store("b" * 40, "model.blob", write(b"good"))
    damaged.write_bytes(b"evil")
    script = f"{sys.executable} -c {shlex.quote(READ_ONLY)} {cache.root}"
    if os.geteuid() == 0:  # root writes through permissions: make the folder a read-only mount instead
        if shutil.which("unshare") is None:
            pytest.skip("needs unshare for a read-only mount when running as root")
        mount = f"mount --bind {cache.root} {cache.root} && mount -o remount,bind,ro {cache.root}"
        cmd = ["unshare", "-m", "sh", "-c", f"{mount} && {script}"]
    else:
        os.chmod(cache.root, 0o555)
        cmd = ["sh", "-c", script]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if os.geteuid() == 0 and "mount" in proc.stderr and proc.returncode != 0 and "OK" not in proc.stdout:
        pytest.skip(f"no read-only mount here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout
    assert "does not match its recorded checksum" in proc.stderr and "cannot remove" in proc.stderr
    assert "cannot store an entry" in proc.stderr
