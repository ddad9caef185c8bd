"""Writing files: output images replace the previous file whole or not at all (a full disk, an exception, a link at
the path), `--overwrite` replaces only an sdrt bundle or an empty folder, and a conversion or export stopped by a
signal or killed outright leaves no staging folder behind for long."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

from sdrt.bundle import MANIFEST, BundleWriter, read_manifest
from sdrt.cli import main
from sdrt.errors import BundleError
from sdrt.files import replacing

PREVIOUS = b"the previous image, which must survive"


def tree(root: Path) -> dict[str, bytes | str]:
    """Every entry under `root` with its bytes (files) or its kind: to compare a folder before and after."""
    return {p.relative_to(root).as_posix(): "link" if p.is_symlink() else p.read_bytes() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


# --- output images ---------------------------------------------------------------------------------------------

def test_an_exception_while_writing_leaves_the_previous_file(tmp_path):
    out = tmp_path / "out.png"
    out.write_bytes(PREVIOUS)
    with pytest.raises(RuntimeError), replacing(out) as f:
        f.write(b"half an image")
        raise RuntimeError("the encoder failed")
    assert out.read_bytes() == PREVIOUS
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no temporary file left


# The CLI in a process whose files may not grow past LIMIT bytes (RLIMIT_FSIZE), as on a disk that is full: a write
# past it fails with EFBIG (SIGXFSZ ignored) at the point where ENOSPC would.
FULL_DISK = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
    from sdrt.cli import main
    sys.exit(main(sys.argv[2:]))
""")
LIMIT = 4096  # bytes: the tiny model's 64x64 PNG is larger, the verified-files record smaller


def test_a_full_disk_leaves_the_previous_image(tiny_sd1_bundle, tmp_path):
    out = tmp_path / "out.png"
    out.write_bytes(PREVIOUS)
    env = {**os.environ, "SDRT_CACHE_DIR": str(tmp_path / "cache"), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(LIMIT), "generate", "a red circle", "-b",
                           str(tiny_sd1_bundle), "-o", str(out), "--steps", "2", "--seed", "1", "-q"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(f"sdrt: error: cannot write {out}: File too large")
    assert "Traceback" not in proc.stderr
    assert out.read_bytes() == PREVIOUS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "out.png"]


def test_a_link_at_the_output_path_is_replaced_not_written_through(tiny_sd1_bundle, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(PREVIOUS)
    out = tmp_path / "out.png"
    out.symlink_to(victim)
    assert main(["generate", "x", "-b", str(tiny_sd1_bundle), "-o", str(out), "--steps", "1", "-q"]) == 0
    assert victim.read_bytes() == PREVIOUS
    assert not out.is_symlink()
    with Image.open(out) as image:
        assert image.size == (64, 64)


# --- --overwrite -----------------------------------------------------------------------------------------------

def _user_folder(out: Path) -> None:
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "figures").mkdir()
    (out / "figures" / "plot.png").write_bytes(b"png")


def _foreign_manifest(out: Path) -> None:
    out.mkdir()
    (out / MANIFEST).write_text(json.dumps({"name": "some other tool's manifest"}))
    (out / "data.bin").write_bytes(b"theirs")


def _bundle_with_user_file(out: Path, bundle: Path) -> None:
    shutil.copytree(bundle, out)
    (out / "unet" / "my-notes.txt").write_text("mine")


def _link_to_bundle(out: Path, bundle: Path) -> None:
    out.symlink_to(bundle, target_is_directory=True)


DESTINATIONS = {  # how the destination is made, and what the refusal says about it
    "folder of user files": (lambda out, b: _user_folder(out), "holds files but no manifest.json"),
    "a file": (lambda out, b: out.write_text("a file"), "is not a folder"),
    "another tool's manifest": (lambda out, b: _foreign_manifest(out), "has a manifest.json sdrt did not write"),
    "bundle plus a user file": (_bundle_with_user_file, "holds unet/my-notes.txt (file), which its manifest"),
    "link to a bundle": (_link_to_bundle, "is a symbolic link"),
}


@pytest.mark.parametrize("command", ["export", "convert"])
@pytest.mark.parametrize("case", list(DESTINATIONS))
def test_overwrite_refuses_what_is_not_a_bundle(tiny_sd1_bundle, tmp_path, capsys, case, command):
    make, reason = DESTINATIONS[case]
    out = tmp_path / "out"
    make(out, tiny_sd1_bundle)
    before = tree(tmp_path)
    source = tmp_path / "no-such-source" if command == "export" else tiny_sd1_bundle
    assert main([command, str(source), "-o", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdrt: error: --overwrite replaces only an sdrt bundle or an empty folder")
    assert reason in err and "left untouched" in err and err.count("\n") == 1
    assert tree(tmp_path) == before


def test_without_overwrite_the_flag_is_named_as_typed(tiny_sd1_bundle, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert main(["convert", str(tiny_sd1_bundle), "-o", str(out)]) == 2
    assert "already exists (pass --overwrite to replace it)" in capsys.readouterr().err
    with pytest.raises(BundleError, match=r"pass overwrite=True to replace it"):
        BundleWriter(out)


def _commit_copy(source: Path, out: Path):
    """A bundle written at `out` the way exports write one: staged, then committed."""
    with BundleWriter(out, overwrite=True) as writer:
        shutil.copytree(source, writer.path, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MANIFEST))
        return writer.commit(read_manifest(source))


@pytest.mark.parametrize("existing", ["empty folder", "sdrt bundle"])
def test_overwrite_replaces_a_bundle_or_an_empty_folder(tiny_sd1_bundle, tmp_path, existing):
    out = tmp_path / "out"
    if existing == "empty folder":
        out.mkdir()
    else:
        shutil.copytree(tiny_sd1_bundle, out)
        (out / "tokenizer" / "merges.txt").write_text("stale")  # a damaged bundle is still the user's to replace
    manifest = _commit_copy(tiny_sd1_bundle, out)
    assert read_manifest(out) == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old folder left


def test_files_added_during_the_export_stop_the_overwrite(tiny_sd1_bundle, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(tiny_sd1_bundle, out)
    with pytest.raises(BundleError, match="holds notes.txt"):
        with BundleWriter(out, overwrite=True) as writer:
            shutil.copytree(tiny_sd1_bundle, writer.path, dirs_exist_ok=True)
            (out / "notes.txt").write_text("written while the export ran")
            writer.commit(read_manifest(tiny_sd1_bundle))
    assert (out / "notes.txt").read_text() == "written while the export ran"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- staging folders -------------------------------------------------------------------------------------------

HOLD = textwrap.dedent("""
    import sys, time
    from sdrt.bundle import BundleWriter
    writer = BundleWriter(sys.argv[1])
    (writer.path / "half-written.onnx").write_bytes(b"x" * 1000)
    print(writer.path, flush=True)
    time.sleep(120)
""")


def _writer_process(out: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    return proc, Path(proc.stdout.readline().strip())


def _partial(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial-"))


def test_staging_left_by_a_hard_kill_is_removed_by_the_next_export(tmp_path):
    out = tmp_path / "bundle"
    killed, killed_path = _writer_process(out)
    alive, alive_path = _writer_process(out)
    try:
        killed.kill()  # SIGKILL: no handler runs, the folder stays
        killed.wait()
        assert killed_path.is_dir() and alive_path.is_dir()
        with BundleWriter(out) as writer:
            assert _partial(out) == sorted([alive_path.name, writer.path.name])  # the live writer's is kept
        assert _partial(out) == [alive_path.name]
    finally:
        alive.kill()
        alive.wait()


def _wait_for(condition, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _converting(out: Path) -> bool:
    """Whether a staging folder of `out` holds a file yet: the engine is imported and converting, with seconds of
    work left (a signal during an engine's import surfaces as an ImportError instead)."""
    try:
        return any(any((out.parent / name).iterdir()) for name in _partial(out))
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 130)])
def test_a_stopped_conversion_removes_its_staging_folder(tiny_sd1_bundle, tmp_path, signum, code):
    pytest.importorskip("openvino")
    out = tmp_path / "bundle"
    proc = subprocess.Popen([sys.executable, "-m", "sdrt", "convert", str(tiny_sd1_bundle), "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _converting(out) or proc.poll() is not None)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
