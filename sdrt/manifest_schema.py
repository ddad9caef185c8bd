"""What a manifest.json may hold, as data: every key sdrt reads, its type and sane range, and the rules across keys.

A bundle may come from a stranger, so nothing in its manifest is trusted: `validate` runs before any object is
built or any memory allocated from it. The ranges are generous bounds on what any SD 1.x / 2.x model needs, tight
enough that no value can make the runtime allocate gigabytes, divide by zero, or compute with NaN.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from sdrt import contracts
from sdrt.errors import BundleError, printable
from sdrt.schema import Either, Flag, Invariant, ListOf, MapOf, Maybe, Number, Record, Text, check_invariants

FORMAT = "sdrt-bundle"
# Raised only when a change alters what existing keys mean; new keys alone keep the version (older sdrts ignore
# them with a warning).
FORMAT_VERSION = 1

MAX_IMAGE_SIDE = 8192  # pixels: 1024x1024 latents, past anything SD 1.x / 2.x was trained near
MAX_BATCH = 64
MAX_TRAIN_TIMESTEPS = 10_000  # SD uses 1000; the training betas are an array of this length
MAX_FILES = 10_000
MAX_MANIFEST_BYTES = 16 << 20  # an SD manifest is about 10 kB
REQUIRED_COMPONENTS = ("text_encoder", "unet", "vae_decoder")
VAE_FAMILY = "vae"  # a VAE-only bundle (sdrt export --vae-only), swapped into a model's with --vae
VAE_COMPONENTS = ("vae_decoder",)

# A path inside the bundle: relative, "/"-separated, no empty, "." or ".." parts (no part starts with a dot), and
# only characters no engine or shell gives a meaning to (ONNX Runtime reads "*/_ORT_MEM_ADDR_/*" as a memory
# address, not a file).
PATH_PART = r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*"
PATH = Text(pattern=rf"(?:{PATH_PART}/){{0,15}}{PATH_PART}", what="a relative path inside the bundle (letters, "
            "digits, . _ + -, '/' between parts, no part starting with '.')", max_len=512)


def is_bundle_path(text: object) -> bool:
    """Whether `text` obeys PATH: relative, normalised, inside the bundle, made of plain characters."""
    return isinstance(text, str) and len(text) <= PATH.max_len and re.fullmatch(PATH.pattern, text) is not None

SHA256 = Text(pattern=r"[0-9a-f]{64}", what="a sha256 in lowercase hex", max_len=64)
NAME = Text(pattern=r"[a-z][a-z0-9_]*", what="a lowercase name", max_len=64)
LABEL = Text(pattern=r"[A-Za-z0-9_.+-]*", what="a short label", max_len=64)


def _int(low: int, high: int) -> Number:
    return Number(low, high, integer=True)


POSITIVE = Number(0, 1e4, open_low=True)
UNIT_OPEN = Number(0, 1, open_low=True, open_high=True)  # betas: strictly between 0 and 1
SIDE = _int(8, MAX_IMAGE_SIDE)
TIMESTEPS = _int(0, MAX_TRAIN_TIMESTEPS)

MODEL = Record({
    "family": Text(choices=("sd1", "sd2", VAE_FAMILY)),
    "prediction_type": Text(choices=("epsilon", "v_prediction", "")),  # "": a VAE-only bundle has none
    "latent_scale_factor": Number(1e-4, 1e4),
    "latent_channels": _int(1, 64),
    "vae_scale_factor": _int(1, 64),
    "default_size": SIDE,
    "name": Text(max_len=256),
    "kind": LABEL,
}, required=("family", "prediction_type", "latent_scale_factor"))

SHAPES = Record({
    "min_size": SIDE, "max_size": SIDE, "multiple_of": _int(1, 1024), "max_batch": _int(1, MAX_BATCH),
    # (width, height) pairs: the only sizes of bundles compiled for static shapes (Core ML); empty: any in range.
    "sizes": ListOf(ListOf(SIDE, 2, 2), 0, 64),
})

TOKENIZER = Record({
    "vocab": PATH, "merges": PATH, "max_length": _int(2, 1024), "pad_token": Text(pattern=r".+", max_len=64),
})

# The diffusers scheduler_config.json keys sdrt's schedules read (sdrt.runtime.noise_levels.SchedulerConfig);
# the rest of a diffusers config passes through unread.
SCHEDULER = Record({
    "_class_name": Text(pattern=r"[A-Za-z0-9_]*", what="a class name", max_len=64),
    "num_train_timesteps": _int(2, MAX_TRAIN_TIMESTEPS),
    "beta_start": UNIT_OPEN,
    "beta_end": UNIT_OPEN,
    "beta_schedule": Text(choices=("linear", "scaled_linear", "squaredcos_cap_v2")),
    "trained_betas": Maybe(ListOf(UNIT_OPEN, 2, MAX_TRAIN_TIMESTEPS)),
    "steps_offset": TIMESTEPS,
    "timestep_spacing": Maybe(Text(choices=("linspace", "leading", "trailing"))),
    "prediction_type": Text(choices=("epsilon", "v_prediction", "sample")),
    "final_sigmas_type": Text(choices=("zero", "sigma_min")),
    "original_inference_steps": _int(1, MAX_TRAIN_TIMESTEPS),
    **{flag: Flag() for flag in (
        "set_alpha_to_one", "rescale_betas_zero_snr", "lower_order_final", "euler_at_final", "use_karras_sigmas",
        "use_exponential_sigmas", "clip_sample", "thresholding",
    )},
}, keep_unknown=True)

DIM = Either((_int(1, 65536), Text(pattern=r"[a-z_][a-z0-9_]*", max_len=64)), "a size from 1 to 65536 or an axis name")
TENSOR = Record({
    "name": Text(pattern=r"[A-Za-z_][A-Za-z0-9_.:/-]*", what="a tensor name", max_len=128),
    "dtype": Text(choices=("float32", "float16", "int32", "int64", "int8", "uint8", "bool")),
    "shape": ListOf(DIM, 0, 8),
}, required=("name", "dtype", "shape"))
CONTRACT = Record({
    "inputs": ListOf(TENSOR, 1, 64), "outputs": ListOf(TENSOR, 1, 64), "notes": Text(), "full_precision": Flag(),
}, required=("inputs", "outputs"))

# transformers' CLIPImageProcessor parameters, as sdrt.runtime.safety.ClipPreprocess reads them.
IMAGE_SIZE = MapOf(Text(choices=("shortest_edge", "height", "width")), _int(1, 4096), max_items=3)
PREPROCESS = Record({
    "size": IMAGE_SIZE, "crop_size": IMAGE_SIZE, "resample": _int(0, 5),
    "image_mean": ListOf(Number(-10, 10), 1, 4), "image_std": ListOf(Number(0, 10, open_low=True), 1, 4),
    "rescale_factor": Number(0, 1, open_low=True),
    **{flag: Flag() for flag in ("do_convert_rgb", "do_resize", "do_center_crop", "do_rescale", "do_normalize")},
})

# Validation records are free-form; the numbers the CLI formats as numbers must be numbers.
MEASURE = Maybe(Number(-1e30, 1e30))
COMPONENT_VALIDATION = Record({"max_abs_error": MEASURE, "tolerance": MEASURE}, keep_unknown=True)
IMAGE_VALIDATION = Record({"psnr_db": MEASURE, "min_psnr_db": MEASURE, "max_pixel_difference": MEASURE,
                           "reference": Text(max_len=256)}, keep_unknown=True)

COMPONENT = Record({
    "file": PATH,
    "files": ListOf(PATH, 1, 1000),  # every file the engine opens for this component, `file` first
    "format": Text(pattern=r"[a-z][a-z0-9_-]*", what="a format name", max_len=32),
    "precision": LABEL,
    "weights_storage": LABEL,
    "contract": CONTRACT,
    "validation": COMPONENT_VALIDATION,
    "preprocess": PREPROCESS,
    # Arrays beside the graph the runtime builds inputs from (the text encoder's token_embedding): name -> .npy.
    "tables": MapOf(Text(pattern=r"[a-z][a-z0-9_]*", what="a table name", max_len=64), PATH, max_items=16),
    "weights_map": PATH,  # where each torch parameter is in `file` (sdrt.weights_map), for LoRA
    # The axis sizes a static-shape file was built for, one dict per shape (Core ML).
    "shapes": ListOf(MapOf(Text(pattern=r"[a-z_]+", what="an axis name", max_len=32), _int(1, 1 << 20), max_items=16),
                     0, 64),
    # The same graph in other precisions (fp16 for GPU engines), by precision.
    "variants": MapOf(LABEL, Record({"file": PATH, "precision": LABEL, "validation": COMPONENT_VALIDATION},
                                    required=("file", "precision")), max_items=8),
}, required=("file", "contract"))

SOURCE = Record({
    "path": Text(), "kind": Text(max_len=64), "sha256": Text(pattern=r"[0-9a-f]*", what="hex", max_len=128),
    "converted_from": Record({"format": Text(max_len=64), "manifest_sha256": SHA256}, keep_unknown=True),
    "validation": IMAGE_VALIDATION,
}, keep_unknown=True)

MANIFEST = Record({
    "format": Text(choices=(FORMAT,)),
    "format_version": _int(1, FORMAT_VERSION),
    "model": MODEL,
    "components": MapOf(NAME, COMPONENT, max_items=64),
    "scheduler": SCHEDULER,
    "tokenizer": TOKENIZER,
    "shapes": SHAPES,
    "source": SOURCE,
    "tools": MapOf(Text(max_len=64), Text(max_len=128), max_items=64),
    "files": MapOf(PATH, SHA256, max_items=MAX_FILES),
}, required=("format", "format_version", "model", "components", "scheduler", "files"))


def load_document(path: Path) -> Any:
    """The JSON value in the file at `path`; BundleError when it is over MAX_MANIFEST_BYTES or not JSON."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise BundleError(f"cannot read {printable(path)}: {e.strerror or e}") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{printable(path)} is over {MAX_MANIFEST_BYTES >> 20} MiB: not a bundle manifest")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a 5000-digit number, lists nested 100k deep
        raise BundleError(f"{printable(path)} is not valid JSON: {printable(e)}") from None


def _sizes_hold(m) -> bool:
    s, model = m.shapes, m.model
    return (s.min_size <= model.default_size <= s.max_size and model.default_size % s.multiple_of == 0
            and s.multiple_of % model.vae_scale_factor == 0)


def _betas_fit(m) -> bool:
    s = m.scheduler  # a missing key takes the scheduler class's default: within these bounds for every class
    n = s.get("num_train_timesteps", 1000)
    trained = s.get("trained_betas")
    return (trained is None or len(trained) == n) and s.get("steps_offset", 0) < n \
        and s.get("original_inference_steps", 50) <= n


# Where the runtime reads a contract's structure itself (the UNet's sample channels, the safety checker's input
# size, the tokenizer's length), the manifest's contract must have the shape sdrt's own contracts give it: the same
# tensor names and ranks, a fixed size where sdrt's is fixed and the same named axis where sdrt's is dynamic.
# The text encoder has two accepted forms: token embeddings in (textual inversion, clip skip) and, in bundles
# written before them, token ids in.
EXPECTED_CONTRACTS = {
    c.component: [c] for c in (
        contracts.unet_contract(1, 1, 1), contracts.vae_decoder_contract(1), contracts.vae_encoder_contract(1),
        contracts.taesd_decoder_contract(1), contracts.safety_checker_contract(1),
    )
}
EXPECTED_CONTRACTS["text_encoder"] = [contracts.text_encoder_contract(1, layers=1),
                                      contracts.legacy_text_encoder_contract(1)]


def _same_structure(want: tuple, got: tuple) -> bool:
    return len(want) == len(got) and all(
        isinstance(g, int) if isinstance(w, int) else g == w for w, g in zip(want, got))


def _fits(expected: contracts.Contract, contract: contracts.Contract) -> bool:
    given = {t.name: t for t in (*contract.inputs, *contract.outputs)}
    return all(t.name in given and _same_structure(t.shape, given[t.name].shape)
               for t in (*expected.inputs, *expected.outputs))


def _contracts_fit(m) -> bool:
    return all(any(_fits(expected, c.contract) for expected in EXPECTED_CONTRACTS[name])
               for name, c in m.components.items() if name in EXPECTED_CONTRACTS)


def _required(m) -> tuple[str, ...]:
    return VAE_COMPONENTS if m.model.family == VAE_FAMILY else REQUIRED_COMPONENTS


def _tokenizer_fits(m) -> bool:
    if "text_encoder" not in m.components:
        return True
    tokens = m.components["text_encoder"].contract.inputs[0]  # ids, or their embeddings: [batch, length, ...]
    return tokens.shape[1] == m.tokenizer.max_length


# Rules across keys, checked on the Manifest built from a valid document (so missing keys have their defaults).
INVARIANTS = (
    Invariant(f"components: a model bundle needs {', '.join(REQUIRED_COMPONENTS)} (a VAE bundle "
              f"{', '.join(VAE_COMPONENTS)})", lambda m: all(c in m.components for c in _required(m))),
    Invariant("model.prediction_type: expected 'epsilon' or 'v_prediction' in a model bundle",
              lambda m: m.model.family == VAE_FAMILY or m.model.prediction_type != ""),
    Invariant("shapes: expected min_size <= model.default_size <= max_size, the default size a multiple of "
              "multiple_of, and multiple_of a multiple of model.vae_scale_factor", _sizes_hold),
    Invariant("scheduler: expected trained_betas to hold num_train_timesteps values, and steps_offset and "
              "original_inference_steps within num_train_timesteps", _betas_fit),
    Invariant("components: a contract lacks a tensor sdrt feeds or reads, or has it in another shape "
              "(see sdrt.contracts)", _contracts_fit),
    Invariant("tokenizer.max_length differs from the text encoder's token length", _tokenizer_fits),
    Invariant("files: expected the bundle's files, got manifest.json itself", lambda m: "manifest.json" not in m.files),
)


def validate(document: Any) -> dict:
    """The manifest document checked against MANIFEST, unknown keys dropped (with a warning); raises BundleError
    with one line naming the first bad key."""
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        found = document.get("format") if isinstance(document, dict) else document
        raise BundleError(f"not an sdrt bundle manifest (format {printable(repr(found))[:40]})")
    version = document.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise BundleError(f"bundle format version {version} is newer than this sdrt reads ({FORMAT_VERSION}): "
                          "upgrade sdrt to open it")
    return MANIFEST.check(document, "")


def check_manifest(manifest) -> None:
    """Raise BundleError when a Manifest built from a valid document breaks a rule across keys (INVARIANTS)."""
    check_invariants(manifest, INVARIANTS)
