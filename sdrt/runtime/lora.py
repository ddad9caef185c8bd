"""LoRAs on a bundle: which files a request applies and how strongly (A1111's `<lora:name:strength>` prompt tags,
`--lora FILE[:STRENGTH]`, `GenerationRequest(loras=...)`), and the weight changes they make per component.

Applied at load, as diffusers' `fuse_lora` and A1111 do: W + strength * scale * W_delta for each module of each
LoRA (sdrt.runtime.lora_formats), summed over LoRAs, given to the backend as WeightDeltas. Parsed files are kept
per pipeline (`Adapters`), keyed by path and stat, so a new strength computes new deltas without reading files.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdrt.backends.base import WeightDeltas
from sdrt.errors import RequestError
from sdrt.runtime.lora_formats import LoraModule, parse_lora
from sdrt.runtime.presets import kind_in_name
from sdrt.runtime.tensor_files import read_safetensors, read_torch_file

# A1111's extra-network syntax (modules/extra_networks.py re_extra_net): <kind:name[:arg]...>, stripped from the
# prompt before it is encoded; `lyco` is LyCORIS' old tag, which A1111 reads as `lora`.
EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
LORA_TAGS = ("lora", "lyco")
SUFFIXES = (".safetensors", ".pt", ".ckpt")  # what A1111's Lora extension lists
HASH_LENGTH = 12  # A1111 network.py: shorthash = hash[0:12]
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights"  # diffusers' file name, which says nothing: its folder names it
COMPONENTS = ("text_encoder", "unet")
# Metadata that names a LoRA (kohya's output name, the model spec title), read for its kind (LCM-LoRA).
NAME_METADATA = ("ss_output_name", "modelspec.title")
LORA_KINDS = ("lcm",)  # kinds a LoRA turns a model into (LCM-LoRA, Luo et al. 2023); "turbo" names are styles


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA a request applies: its file, the name it was asked by, and its strengths (A1111: te and unet)."""

    path: Path
    name: str
    text_encoder: float = 1.0
    unet: float = 1.0
    in_prompt: bool = False  # asked for by a prompt tag (the infotext's prompt already says so)

    def strength(self, component: str) -> float:
        return self.text_encoder if component == "text_encoder" else self.unet


def strip_tags(prompt: str) -> str:
    """The prompt without its extra-network tags, as the text encoder sees it."""
    return EXTRA_NETWORK.sub("", prompt)


def _multipliers(args: list[str], tag: str) -> tuple[float, float]:
    """A1111 networks.py: positional te then unet multipliers (unet defaults to te), or te= / unet= named."""
    positional = [a for a in args if "=" not in a]
    named = dict(a.split("=", 1) for a in args if "=" in a)
    try:
        te = float(named.get("te", positional[0] if positional else 1.0))
        return te, float(named.get("unet", positional[1] if len(positional) > 1 else te))
    except ValueError:
        raise RequestError(f"prompt tag {tag}: strengths must be numbers") from None


def prompt_loras(prompt: str, lora_dir: Path | str | None) -> list[LoraSpec]:
    """The LoRAs a prompt's `<lora:name[:te[:unet]]>` tags ask for, found by name in `lora_dir`."""
    specs = []
    for match in EXTRA_NETWORK.finditer(prompt):
        kind, (name, *args) = match.group(1), match.group(2).split(":")
        if kind not in LORA_TAGS:
            raise RequestError(f"prompt tag {match.group(0)}: sdrt applies <lora:...> only, not <{kind}:...>")
        te, unet = _multipliers(args, match.group(0))
        specs.append(LoraSpec(find_lora(name, lora_dir), name, te, unet, in_prompt=True))
    return specs


def find_lora(name: str, lora_dir: Path | str | None) -> Path:
    """The file `lora_dir/**/name.{safetensors,pt,ckpt}` (A1111 looks LoRAs up by file name, in subfolders too)."""
    if lora_dir is None:
        raise RequestError(f"prompt asks for LoRA {name!r}: give the folder LoRAs are in (--lora-dir)")
    root = Path(lora_dir)
    if not root.is_dir():
        raise RequestError(f"LoRA folder {root} does not exist")
    found = sorted(p for p in root.rglob("*") if p.suffix.lower() in SUFFIXES and
                   (p.stem == name or p.relative_to(root).with_suffix("").as_posix() == name))
    if len(found) != 1:
        detail = "none" if not found else ", ".join(str(p) for p in found)
        raise RequestError(f"LoRA {name!r}: expected one file named {name}.safetensors (or .pt) in {root}, found "
                           f"{detail}")
    return found[0]


def given_lora(item) -> LoraSpec:
    """A request's `loras` item: a LoraSpec, a path, or (path, strength)."""
    if isinstance(item, LoraSpec):
        return item
    path, strength = (item, 1.0) if isinstance(item, (str, Path)) else item
    if not isinstance(strength, (int, float)) or not np.isfinite(strength):
        raise RequestError(f"LoRA {path}: strength must be a finite number, got {strength!r}")
    return LoraSpec(Path(path), Path(path).stem, float(strength), float(strength))


def parse_lora_argument(text: str) -> tuple[Path, float]:
    """`FILE[:STRENGTH]` (the CLI's --lora): the strength is what follows the last colon, if it is a number."""
    path, _, strength = text.rpartition(":")
    try:
        return (Path(path), float(strength)) if path else (Path(text), 1.0)
    except ValueError:
        return Path(text), 1.0


def resolve_loras(prompt: str, loras, lora_dir: Path | str | None) -> tuple[LoraSpec, ...]:
    """Every LoRA a request applies (its `loras`, then its prompt's tags), each file checked to exist. Specs that
    came from tags are dropped from `loras` and read again: resolving a resolved request changes nothing."""
    given = [given_lora(item) for item in loras]
    specs = [s for s in given if not s.in_prompt] + prompt_loras(prompt, lora_dir)
    for spec in specs:
        if not spec.path.is_file():
            raise RequestError(f"LoRA file {spec.path} does not exist")
        if spec.path.suffix.lower() not in SUFFIXES:
            raise RequestError(f"LoRA file {spec.path}: expected one of {', '.join(SUFFIXES)}")
    return tuple(specs)


def lora_kind(specs: tuple[LoraSpec, ...]) -> str | None:
    """The model kind a request's LoRAs make (lcm with an LCM-LoRA), from their names and metadata."""
    for spec in specs:
        names = [spec.path.stem, spec.name]
        if spec.path.stem == DIFFUSERS_WEIGHT_NAME:
            names.append(spec.path.parent.name)  # latent-consistency/lcm-lora-sdv1-5/pytorch_lora_weights
        if spec.path.suffix.lower() == ".safetensors":
            metadata = read_safetensors(spec.path)[1]
            names += [metadata.get(key, "") for key in NAME_METADATA]
        kind = next((k for k in map(kind_in_name, names) if k in LORA_KINDS), None)
        if kind:
            return kind
    return None


@dataclass(frozen=True)
class LoraFile:
    """A parsed LoRA file: its modules, metadata, content hash and A1111's short hash."""

    path: Path
    modules: tuple[LoraModule, ...]
    metadata: dict
    sha256: str
    shorthash: str


def _hashes(path: Path) -> tuple[str, str]:
    """(sha256 of the file, A1111's LoRA hash): for .safetensors the sha256 of the bytes after the header
    (modules/hashes.py addnet_hash_safetensors), else the file's sha256; both from one read."""
    whole, data = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        whole.update(head)
        if path.suffix.lower() == ".safetensors" and len(head) == 8:
            header = f.read(int.from_bytes(head, "little"))
            whole.update(header)
        else:
            data.update(head)
        while chunk := f.read(1 << 22):
            whole.update(chunk)
            data.update(chunk)
    return whole.hexdigest(), data.hexdigest()


def read_lora_file(path: Path) -> LoraFile:
    """Parse a LoRA file (.safetensors, or a .pt / .ckpt through the arrays-only unpickler)."""
    if path.suffix.lower() == ".safetensors":
        tensors, metadata = read_safetensors(path)
    else:
        state, metadata = read_torch_file(path), {}
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
            raise RequestError(f"{path}: expected a dict of tensors")
        tensors = state
    sha256, lora_hash = _hashes(path)
    shorthash = (metadata.get("sshs_model_hash") or lora_hash)[:HASH_LENGTH]
    return LoraFile(path, tuple(parse_lora(tensors, metadata)), metadata, sha256, shorthash)


@dataclass(frozen=True)
class _Sum:
    """One weight's change: the sum over LoRAs of strength * module change (a Delta, sdrt.backends.base)."""

    terms: tuple[tuple[LoraModule, float], ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.terms[0][0].shape

    def __call__(self) -> np.ndarray:
        total = np.zeros(self.shape, np.float32)
        for module, strength in self.terms:
            total += np.float32(strength) * module.delta().reshape(self.shape)
        return total


class Adapters:
    """Parsed LoRA files of one pipeline, kept while unchanged on disk; builds each component's WeightDeltas."""

    def __init__(self):
        self._files: dict[tuple, LoraFile] = {}

    def file(self, path: Path) -> LoraFile:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in self._files:
            self._files[key] = read_lora_file(path)
        return self._files[key]

    def deltas(self, specs: tuple[LoraSpec, ...], component: str) -> WeightDeltas | None:
        """The changes `specs` make to `component`, None when they make none."""
        terms: dict[str, list] = {}
        identity = []
        for spec in specs:
            strength, lora = spec.strength(component), self.file(spec.path)
            modules = [m for m in lora.modules if m.component == component]
            if strength == 0 or not modules:
                continue
            identity.append([lora.sha256, strength])
            for module in modules:
                terms.setdefault(module.target, []).append((module, strength))
        if not terms:
            return None
        key = hashlib.sha256(json.dumps([component, identity]).encode()).hexdigest()[:32]
        return WeightDeltas(key, {target: _Sum(tuple(t)) for target, t in terms.items()})

    def hashes(self, specs: tuple[LoraSpec, ...]) -> str | None:
        """A1111's `Lora hashes` infotext value: "name: hash, ..." (names without ':' and ',')."""
        items = [f"{re.sub('[:,]', '', s.name)}: {self.file(s.path).shorthash}" for s in specs]
        return ", ".join(items) or None


def infotext_prompt(prompt: str, specs: tuple[LoraSpec, ...]) -> str:
    """The prompt as the infotext records it: with a `<lora:name:strength>` tag for each LoRA given outside it, so
    A1111 (and sdrt) reading the PNG applies the same LoRAs."""
    tags = [f"<lora:{s.name}:{s.unet:g}>" if s.unet == s.text_encoder else f"<lora:{s.name}:{s.text_encoder:g}:"
            f"{s.unet:g}>" for s in specs if not s.in_prompt]
    return " ".join([prompt, *tags]) if tags else prompt
