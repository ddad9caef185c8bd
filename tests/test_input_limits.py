"""Inputs are checked before work: image sizes from the header (a decompression bomb costs no memory), prompts
bounded in characters and 75-token chunks, undecodable command-line bytes, and every invalid value refused rather
than replaced by a default."""
from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
import zlib

import pytest
from PIL import Image

from sdrt.cli import main
from sdrt.errors import RequestError
from sdrt.runtime.pipeline import default_bundle
from sdrt.runtime.prompts import MAX_CHUNKS, MAX_PROMPT_CHARS, tokenize_weighted
from sdrt.runtime.request import GenerationRequest
from sdrt.runtime.tokenizer import ClipTokenizer

# A decoded image of the bomb below holds at least 81 MB (one byte per pixel); refused from its header, generation
# must grow the process by far less. The margin covers allocator noise of a refused run (a few MB measured).
BOMB_SIDE = 9000
MAX_GROWTH_MB = 30


def bomb_png(path, width: int, height: int):
    """A valid 1-bit greyscale PNG of zeros: kilobytes on disk, width * height bytes once Pillow decodes it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width + 7) // 8)  # filter type 0, then the packed bits of one row
    z, rows_per_call = zlib.compressobj(), max(1, (1 << 22) // len(row))
    idat = b"".join(z.compress(row * min(rows_per_call, height - y)) for y in range(0, height, rows_per_call))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat + z.flush())
                     + chunk(b"IEND", b""))
    return path


# Generation in a fresh process, its peak memory measured after everything generation imports is loaded.
MEASURE = textwrap.dedent("""
    import resource, sys
    import sdrt.cli, sdrt.runtime.pipeline, sdrt.runtime.image, tqdm
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rc = sdrt.cli.main(sys.argv[1:])
    print("GROWTH_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    sys.exit(rc)
""")


@pytest.mark.parametrize("side, option", [(BOMB_SIDE, "--init-image"), (BOMB_SIDE, "--mask"), (20_000, "--mask")])
def test_decompression_bomb_is_refused_before_decoding(tiny_sd1_bundle, tmp_path, side, option):
    bomb = bomb_png(tmp_path / "bomb.png", side, side)
    assert bomb.stat().st_size < 200_000 and struct.unpack(">II", bomb.read_bytes()[16:24]) == (side, side)
    init = ["--init-image", str(bomb)] if option == "--init-image" else ["--init-image", str(bomb), "--mask",
                                                                        str(bomb)]
    proc = subprocess.run([sys.executable, "-c", MEASURE, "generate", "x", "-b", str(tiny_sd1_bundle), "-o",
                           str(tmp_path / "o.png"), *init], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("sdrt: error:") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Mpixel" in proc.stderr and "cannot read" not in proc.stderr
    growth_kb = int(proc.stdout.split("GROWTH_KB")[1])
    assert growth_kb < MAX_GROWTH_MB * 1024, f"grew {growth_kb / 1024:.0f} MB"


def test_a_lazily_opened_bomb_is_refused_by_the_request(sdrt_pipe, tmp_path):
    with Image.open(bomb_png(tmp_path / "bomb.png", BOMB_SIDE, BOMB_SIDE)) as lazy:
        with pytest.raises(RequestError, match="9000x9000 pixels; at most 64 Mpixel"):
            GenerationRequest("x", init_image=lazy, seed=1).resolve(sdrt_pipe.manifest)


def test_unsupported_or_broken_images_are_one_line(tiny_sd1_bundle, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    Image.effect_noise((64, 64), 64).save(broken)
    broken.write_bytes(broken.read_bytes()[:2000])  # cut in the middle of the pixel data
    Image.new("RGB", (64, 64)).save(tmp_path / "image.tiff")
    for path, message in ((broken, "cannot read the init image"), (tmp_path / "image.tiff", "not a PNG, JPEG")):
        rc = main(["generate", "x", "-b", str(tiny_sd1_bundle), "--init-image", str(path), "-o",
                   str(tmp_path / "o.png")])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and err.count("\n") == 1, err


# --- prompts ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    root = default_bundle() / "tokenizer"
    return ClipTokenizer.from_files(root / "vocab.json", root / "merges.txt")


def test_long_prompts_keep_their_chunks_up_to_the_limit(tokenizer):
    word = "red "  # one token each
    assert len(tokenize_weighted(tokenizer, word * 75 * MAX_CHUNKS)) == MAX_CHUNKS
    with pytest.raises(RequestError, match=f"over {MAX_CHUNKS} chunks of 75 tokens"):
        tokenize_weighted(tokenizer, word * (75 * MAX_CHUNKS + 1))
    with pytest.raises(RequestError, match="over 32 chunks"):  # BREAK starts a chunk each: no way around the bound
        tokenize_weighted(tokenizer, "a BREAK " * (MAX_CHUNKS + 1))


def test_prompt_length_is_bounded_before_parsing(sdrt_pipe):
    for field in ("prompt", "negative_prompt"):
        fields = {"prompt": "x", field: "(" * (MAX_PROMPT_CHARS + 1)}
        with pytest.raises(RequestError, match=f"is {MAX_PROMPT_CHARS + 1} characters long; at most"):
            GenerationRequest(**fields).resolve(sdrt_pipe.manifest)


def test_invalid_utf8_on_the_command_line_is_one_line(tiny_sd1_bundle, tmp_path):
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    proc = subprocess.run([sys.executable, "-m", "sdrt", "generate", b"a \xff red circle", "-b",
                           str(tiny_sd1_bundle), "-o", str(tmp_path / "o.png"), "-q"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert proc.stderr == "sdrt: error: prompt is not valid UTF-8 text: \\xff at character 2\n"
    # an undecodable byte in a file name is fine: the file is written and its name printed escaped
    out = os.fsencode(tmp_path) + b"/\xfe.png"
    proc = subprocess.run([sys.executable, "-m", "sdrt", "generate", "a red circle", "-b", str(tiny_sd1_bundle),
                           "-o", out, "--steps", "1", "-q"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert os.path.exists(out) and "\\xfe.png (seed" in proc.stdout


# --- invalid values are refused, not replaced ------------------------------------------------------------------

INIT = ["--init-image", "{image}"]
INVALID = {
    "zero width": (["-W", "0"], "width must be a multiple of 8 from 64 to 2048, got 0"),
    "zero height": (["-H", "0"], "height must be a multiple of 8"),
    "negative mask blur": ([*INIT, "--mask", "{image}", "--mask-blur", "-1"],
                           "mask blur must be an integer from 0 to 2048, got -1"),
    "negative padding": (["--padding", "-1"], "padding must be an integer from 0 to 2048, got -1"),
    "NaN eta": (["--eta", "nan"], "eta must be a finite number, got nan"),
    "infinite guidance": (["--cfg-scale", "inf"], "guidance scale must be a finite number, got inf"),
    "NaN strength": ([*INIT, "--strength", "nan"], "strength must be a finite number, got nan"),
    "rescale above one": (["--cfg-rescale", "2"], "guidance rescale must be within [0, 1], got 2.0"),
    "zero batch": (["--batch-size", "0"], "batch size must be from 1"),
    "negative seed": (["--seed", "-2"], "seed must be -1 (random) or an integer from 0"),
    "too many steps": (["--steps", "100000"], "steps must be an integer from 1 to 1000"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_values_are_refused(tiny_sd1_bundle, tmp_path, capsys, case):
    image = tmp_path / "image.png"
    Image.new("RGB", (64, 64), "white").save(image)
    args, message = INVALID[case]
    args = [a.format(image=image) for a in args]
    rc = main(["generate", "x", "-b", str(tiny_sd1_bundle), "-o", str(tmp_path / "o.png"), "-q", *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("sdrt: error:") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o.png").exists()


def test_preview_every_must_be_positive(tiny_sd1_bundle, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["generate", "x", "-b", str(tiny_sd1_bundle), "--preview-every", "0"])
    assert stop.value.code == 2 and "expected an integer >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("field, value, message", [
    ("fast_decode", "no", "fast decode must be true or false"),
    ("watermark", 1, "watermark must be true or false"),
    ("eta", "0.5", "eta must be a finite number"),
    ("steps", 2.5, "steps must be an integer"),
    ("width", True, "width must be an integer"),
    ("sampler", ["Euler"], "sampler must be a name"),
    ("schedule", "Karras" * 100, "schedule must be a name of at most 64 characters"),
    ("prompt", b"bytes", "prompt must be a string"),
])
def test_request_fields_are_typed(sdrt_pipe, field, value, message):
    fields = {"prompt": "x", field: value}
    with pytest.raises(RequestError, match=message):
        GenerationRequest(**fields).resolve(sdrt_pipe.manifest)
