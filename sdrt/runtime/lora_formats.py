"""LoRA files as layers to change: kohya / A1111 (LoRA, LoCon, LoHa, LoKr) and diffusers / PEFT state dicts, each
module named by the torch weight it changes and able to compute its change in numpy.

The math is A1111's (extensions-builtin/Lora: network_lora.py, network_hada.py, network_lokr.py, lyco_helpers.py):
a module's change is `scale * W_delta`, `scale` = alpha / rank (1 without alpha, or the module's `scale` key),
W_delta = up @ down (LoRA; LoCon's convolutions flattened, with the Tucker `lora_mid` core when present), the
Hadamard product of two low-rank products (LoHa), or a Kronecker product (LoKr). diffusers / PEFT files give
`lora_B @ lora_A` with alpha from `.alpha` keys or the file's `lora_adapter_metadata` (r and lora_alpha as
PEFT's LoraConfig), as diffusers' load_lora_weights reads them.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import numpy as np

from sdrt.errors import RequestError
from sdrt.weights_map import TEXT_MODEL_PREFIX

COMPONENTS = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
DIFFUSERS_COMPONENTS = ("unet", "text_encoder")
# Module-name words that contain an underscore, in diffusers' UNet2DConditionModel and transformers' CLIPTextModel:
# kohya writes `down_blocks_0_attentions_0_proj_in`, which splits back into modules at every other underscore.
COMPOUND_WORDS = frozenset({
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "proj_in", "proj_out", "conv_in", "conv_out",
    "conv_shortcut", "time_emb_proj", "time_embedding", "linear_1", "linear_2", "to_q", "to_k", "to_v", "to_out",
    "conv_norm_out", "add_embedding", "class_embedding", "text_model", "self_attn", "q_proj", "k_proj", "v_proj",
    "out_proj", "final_layer_norm", "layer_norm1", "layer_norm2", "token_embedding", "position_embedding",
})
LONGEST_COMPOUND = 3  # words in the longest compound (time_emb_proj, final_layer_norm)
# Keys of kinds A1111 reads that sdrt does not apply: suffix -> the kind's name in refusals.
UNSUPPORTED = {
    "diff": "full weight differences", "diff_b": "full bias differences", "w_norm": "norm layer changes",
    "b_norm": "norm layer changes", "on_input": "IA3", "oft_blocks": "OFT", "oft_diag": "OFT", "a1.weight": "GLoRA",
    "dora_scale": "DoRA", "bias": "LoRA bias terms", "lora_magnitude_vector": "DoRA", "lora_B.bias": "LoRA bias terms",
}
KOHYA_PARTS = {
    "lora": ("lora_up.weight", "lora_down.weight", "lora_mid.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY (loaders/lora_base.py)


@dataclass(frozen=True)
class LoraModule:
    """One layer's change: the component and torch module it targets, its factors, and their kind."""

    component: str
    module: str  # torch module name, e.g. down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q
    kind: str  # "lora" | "loha" | "lokr"
    w: dict[str, np.ndarray] = field(repr=False)
    alpha: float | None = None
    scale: float | None = None  # an explicit `.scale` key overrides alpha / rank (A1111's calc_scale)
    rslora: bool = False  # PEFT's use_rslora: alpha / sqrt(rank)

    @property
    def target(self) -> str:
        """The torch weight it changes, text-encoder names without transformers 4's `text_model.` (every file
        spells one weight one way, so LoRAs of both spellings add up: sdrt.weights_map.WeightsMap.find)."""
        return f"{self.module.removeprefix(TEXT_MODEL_PREFIX)}.weight"

    @property
    def rank(self) -> int | None:
        """The dim alpha is divided by (A1111: lora_down's rows, hada_w1_b's, lokr_w2_b's else lokr_w1_b's)."""
        if self.kind == "lora":
            return self.w["lora_down.weight"].shape[0]
        if self.kind == "loha":
            return self.w["hada_w1_b"].shape[0]
        b = self.w.get("lokr_w2_b", self.w.get("lokr_w1_b"))
        return None if b is None else b.shape[0]

    def multiplier(self) -> float:
        """scale, else alpha / rank (sqrt(rank) for rsLoRA), else 1."""
        if self.scale is not None:
            return self.scale
        if self.alpha is None or self.rank is None:
            return 1.0
        return self.alpha / (np.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the weight this changes."""
        return tuple(_DELTAS[self.kind](self.w, shape_only=True))

    def delta(self) -> np.ndarray:
        """The weight change at strength 1, float32."""
        w = {k: v.astype(np.float32) for k, v in self.w.items()}
        return (_DELTAS[self.kind](w) * np.float32(self.multiplier())).astype(np.float32)


def _flat(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1)


def _lora(w: dict, shape_only: bool = False):
    up, down, mid = w["lora_up.weight"], w["lora_down.weight"], w.get("lora_mid.weight")
    shape = [up.shape[0], down.shape[1], *(mid.shape[2:] if mid is not None else down.shape[2:])]
    if shape_only:
        return shape
    if mid is not None:  # lyco_helpers.rebuild_cp_decomposition
        return np.einsum("nmkl,in,mj->ijkl", mid, _flat(up), _flat(down))
    return (_flat(up) @ _flat(down)).reshape(shape)


def _cp(t: np.ndarray, wa: np.ndarray, wb: np.ndarray) -> np.ndarray:
    """lyco_helpers.make_weight_cp: a Tucker core `t` with its two factor matrices."""
    return np.einsum("ijkl,ir->rjkl", np.einsum("ijkl,jr->irkl", t, wb), wa)


def _loha(w: dict, shape_only: bool = False):
    w1a, w1b, t1 = w["hada_w1_a"], w["hada_w1_b"], w.get("hada_t1")
    shape = [w1a.shape[1], w1b.shape[1], *t1.shape[2:]] if t1 is not None else [w1a.shape[0], w1b.shape[1],
                                                                                 *w1b.shape[2:]]
    if shape_only:
        return shape
    first = _cp(t1, w1a, w1b) if t1 is not None else (_flat(w1a) @ _flat(w1b)).reshape(shape)
    t2 = w.get("hada_t2")
    second = _cp(t2, w["hada_w2_a"], w["hada_w2_b"]) if t2 is not None else \
        (_flat(w["hada_w2_a"]) @ _flat(w["hada_w2_b"])).reshape(shape)
    return first * second


def _lokr_factor(w: dict, n: int, shape_only: bool) -> np.ndarray | tuple:
    full, a, b, t = w.get(f"lokr_w{n}"), w.get(f"lokr_w{n}_a"), w.get(f"lokr_w{n}_b"), w.get(f"lokr_t{n}")
    if full is not None:
        return full.shape if shape_only else full
    if t is not None:
        return (a.shape[1], b.shape[1], *t.shape[2:]) if shape_only else _cp(t, a, b)
    return (a.shape[0], *b.shape[1:]) if shape_only else a @ b


def _lokr(w: dict, shape_only: bool = False):
    w1, w2 = _lokr_factor(w, 1, shape_only), _lokr_factor(w, 2, shape_only)
    if shape_only:
        return [w1[0] * w2[0], w1[1] * w2[1], *w2[2:]]
    if w2.ndim == 4:  # network_lokr.make_kron: the first factor spreads over the kernel unchanged
        w1 = w1[:, :, None, None]
    return np.kron(w1, w2)


_DELTAS = {"lora": _lora, "loha": _loha, "lokr": _lokr}


def _refuse_unsupported(keys) -> None:
    for key in keys:
        for suffix, what in UNSUPPORTED.items():
            if key.endswith("." + suffix):
                raise RequestError(f"{what} ({key}) are not supported; sdrt applies LoRA, LoCon, LoHa and LoKr")


def kohya_module(name: str) -> tuple[str, str]:
    """(component, torch module name) of a kohya module name: lora_unet_down_blocks_0_attentions_0_proj_in ->
    (unet, down_blocks.0.attentions.0.proj_in)."""
    prefix = next((p for p in COMPONENTS if name.startswith(p)), None)
    if prefix is None:
        what = "SDXL's second text encoder" if name.startswith("lora_te2_") else "a module sdrt knows"
        raise RequestError(f"LoRA module {name!r} is not for the UNet or text encoder of SD 1.x/2.x ({what})")
    words, parts, i = name[len(prefix):].split("_"), [], 0
    while i < len(words):
        n = next((n for n in range(LONGEST_COMPOUND, 1, -1) if "_".join(words[i:i + n]) in COMPOUND_WORDS), 1)
        parts.append("_".join(words[i:i + n]))
        i += n
    return COMPONENTS[prefix], ".".join(parts)


def _kind(parts: set[str], name: str) -> str:
    for kind, names in KOHYA_PARTS.items():
        if parts & set(names):
            return kind
    raise RequestError(f"LoRA module {name!r} has parts {sorted(parts)}, none of a LoRA, LoCon, LoHa or LoKr")


def parse_kohya(tensors: dict[str, np.ndarray]) -> list[LoraModule]:
    """Modules of a kohya / A1111 file: `<module>.<part>` keys, parts of one kind each, optional alpha and scale."""
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        name, _, part = key.partition(".")
        grouped.setdefault(name, {})[part] = value
    modules = []
    for name, parts in grouped.items():
        alpha, scale = parts.pop("alpha", None), parts.pop("scale", None)
        component, module = kohya_module(name)
        modules.append(LoraModule(component, module, _kind(set(parts), name), parts, _item(alpha), _item(scale)))
    return modules


def _item(value: np.ndarray | None) -> float | None:
    return None if value is None else float(np.asarray(value, np.float64).reshape(-1)[0])


# Old diffusers attention-processor names -> the module they change (diffusers' _convert_unet_lora_key inverse).
_OLD_DIFFUSERS = [
    (re.compile(r"\.processor\.(to_[qkv])_lora\.(down|up)\.weight$"), r".\1.lora_\2.weight"),
    (re.compile(r"\.processor\.to_out_lora\.(down|up)\.weight$"), r".to_out.0.lora_\1.weight"),
    (re.compile(r"\.self_attn\.to_([qkv])_lora\.(down|up)\.weight$"), r".self_attn.\1_proj.lora_\2.weight"),
    (re.compile(r"\.self_attn\.to_out_lora\.(down|up)\.weight$"), r".self_attn.out_proj.lora_\1.weight"),
    (re.compile(r"\.lora_linear_layer\.(down|up)\.weight$"), r".lora_\1.weight"),
    (re.compile(r"\.lora\.(down|up)\.weight$"), r".lora_\1.weight"),
    (re.compile(r"\.lora_A\.weight$"), ".lora_down.weight"),
    (re.compile(r"\.lora_B\.weight$"), ".lora_up.weight"),
]


def _diffusers_key(key: str) -> tuple[str, str, str]:
    """(component, module, part) of a diffusers / PEFT key; unprefixed keys are the UNet's (diffusers' oldest)."""
    for pattern, replacement in _OLD_DIFFUSERS:
        if pattern.search(key):
            key = pattern.sub(replacement, key)
            break
    else:
        if not key.endswith(".alpha"):
            raise RequestError(f"LoRA key {key!r} is neither kohya nor diffusers / PEFT")
    component, _, rest = key.partition(".")
    if component not in DIFFUSERS_COMPONENTS:
        component, rest = "unet", key
    module, _, part = rest.rpartition(".lora_") if not rest.endswith(".alpha") else (rest[:-6], "", "alpha")
    return component, module, part if part == "alpha" else "lora_" + part


def parse_diffusers(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> list[LoraModule]:
    """Modules of a diffusers / PEFT file, with alpha from `.alpha` keys, else the adapter metadata, else rank."""
    grouped: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        component, module, part = _diffusers_key(key)
        grouped.setdefault((component, module), {})[part] = value
    config = _adapter_config(metadata)
    modules = []
    for (component, module), parts in grouped.items():
        alpha = _item(parts.pop("alpha", None))
        if alpha is None:
            alpha = _metadata_alpha(config, component, module)
        rslora = bool(config.get(f"{component}.use_rslora", False))
        modules.append(LoraModule(component, module, "lora", parts, alpha, rslora=rslora))
    return modules


def _adapter_config(metadata: dict[str, str]) -> dict:
    try:
        return json.loads(metadata.get(METADATA_KEY, "{}"))
    except ValueError:
        raise RequestError(f"LoRA metadata {METADATA_KEY} is not JSON") from None


def _metadata_alpha(config: dict, component: str, module: str) -> float | None:
    """PEFT's LoraConfig: alpha_pattern entries match a module name's end (peft's `(.*\\.)?{key}$`), else
    lora_alpha. None without metadata: alpha = rank, diffusers' default (get_peft_kwargs)."""
    patterns = config.get(f"{component}.alpha_pattern") or {}
    for pattern, alpha in patterns.items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return float(alpha)
    alpha = config.get(f"{component}.lora_alpha")
    return None if alpha is None else float(alpha)


def parse_lora(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> list[LoraModule]:
    """The modules of a LoRA state dict in either family of formats, refusing kinds sdrt does not apply."""
    if not tensors:
        raise RequestError("the LoRA file holds no tensors")
    _refuse_unsupported(tensors)
    kohya = [k.startswith(("lora_unet_", "lora_te")) for k in tensors]
    if all(kohya):
        return parse_kohya(tensors)
    if any(kohya):
        raise RequestError("the LoRA file mixes kohya (lora_unet_*, lora_te_*) and other key names")
    return parse_diffusers(tensors, metadata)
