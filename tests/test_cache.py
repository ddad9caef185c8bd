"""Remembered checksums (sdrt.cache.VerifiedFiles): a verified, unchanged file is not hashed again on the next
start; any change to it, or a file too fresh to be told apart from a later edit, is hashed."""
from __future__ import annotations

import os
import shutil
import time

import pytest

import sdrt.bundle
import sdrt.cache
from sdrt.bundle import read_manifest, sha256_file, verify_files
from sdrt.cache import VerifiedFiles, cache_home
from sdrt.errors import BundleError

SETTLE_S = 0.2  # stands in for the 2 s of sdrt.cache.SETTLE_S so the tests wait less


@pytest.fixture
def counted(monkeypatch, tmp_path):
    """The cache under tmp_path, a short settle time, and a count of the files verify_files hashes."""
    monkeypatch.setenv("SDRT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sdrt.cache, "SETTLE_S", SETTLE_S)
    hashed = []

    def counting(path):
        hashed.append(path.name)
        return sha256_file(path)

    monkeypatch.setattr(sdrt.bundle, "sha256_file", counting)
    return hashed


@pytest.fixture
def bundle(tiny_sd1_bundle, tmp_path):
    """A private copy of the tiny bundle (its files get modified), settled."""
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_sd1_bundle, copy)
    time.sleep(SETTLE_S * 1.5)
    return copy


def test_cache_home_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("SDRT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_home() == tmp_path / "sdrt"
    monkeypatch.setenv("SDRT_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert cache_home() == tmp_path / "elsewhere"


def test_cache_home_follows_the_os_convention_on_macos(monkeypatch, tmp_path):
    """Off Linux the folder is the OS's own (platformdirs): ~/Library/Caches/sdrt on macOS."""
    import platformdirs
    from platformdirs.macos import MacOS

    monkeypatch.delenv("SDRT_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(platformdirs, "PlatformDirs", MacOS)  # platformdirs picks its class for the OS at import
    assert cache_home() == tmp_path / "Library" / "Caches" / "sdrt"


def test_unchanged_files_are_hashed_once(counted, bundle):
    manifest = read_manifest(bundle)
    verify_files(bundle, manifest)
    assert sorted(counted) == sorted(os.path.basename(rel) for rel in manifest.files)
    counted.clear()
    verify_files(bundle, manifest)
    assert counted == []
    verify_files(bundle, manifest, remembered=False)  # the full check is still there when asked for
    assert len(counted) == len(manifest.files)


def test_an_edit_that_restores_size_and_mtime_is_still_caught(counted, bundle):
    manifest = read_manifest(bundle)
    verify_files(bundle, manifest)
    target = bundle / manifest.components["unet"].file
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only ctime tells
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(BundleError, match="checksum mismatch"):
        verify_files(bundle, manifest)


def test_fresh_files_are_not_remembered(counted, bundle):
    manifest = read_manifest(bundle)
    target = bundle / manifest.components["unet"].file
    target.write_bytes(target.read_bytes())  # same content, changed just now
    verify_files(bundle, manifest)
    counted.clear()
    verify_files(bundle, manifest)
    assert counted == [target.name]  # too fresh to be told apart from an edit in the same clock tick


def test_an_unreadable_record_costs_a_rehash_not_an_error(counted, bundle, tmp_path):
    manifest = read_manifest(bundle)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / sdrt.cache.VERIFIED).write_text("{not json")
    verify_files(bundle, manifest)
    assert len(counted) == len(manifest.files)
    unet = manifest.components["unet"].file
    assert VerifiedFiles().known(bundle / unet, manifest.files[unet])
