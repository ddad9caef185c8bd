"""I/O contracts of the exported components, stated once as data for export, bundles and backends."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from sdrt.errors import ContractError

# A dimension is a fixed size (int) or the name of a dynamic axis (str) bound at run time.
Dim = int | str

# Names of the dynamic axes, shared by export (ONNX dynamic axes) and backends (static reshapes).
BATCH, SEQUENCE = "batch", "sequence"
HEIGHT, WIDTH = "height", "width"
LATENT_HEIGHT, LATENT_WIDTH = "latent_height", "latent_width"

# The text encoder's tensors. Bundles written before textual inversion and clip skip took `input_ids` (int32) and
# gave `last_hidden_state`; the runtime still reads those (sdrt.runtime.text_encoder).
TEXT_INPUT, TEXT_OUTPUT, TOKEN_TABLE = "inputs_embeds", "hidden_states", "token_embedding"


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor: dtype (a numpy name) and shape (ints and named dynamic axes)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping) -> TensorSpec:
        return cls(d["name"], d["dtype"], tuple(d["shape"]))

    def bind(self, array: np.ndarray, dims: dict[str, int], component: str) -> None:
        """Check `array` against this spec, binding named axes into `dims` (consistent across tensors)."""
        where = f"{component}.{self.name}"
        if array.dtype != np.dtype(self.dtype):
            raise ContractError(f"{where}: expected dtype {self.dtype}, got {array.dtype}")
        if array.ndim != len(self.shape):
            raise ContractError(f"{where}: expected shape {self.shape}, got {array.shape}")
        for axis, (want, got) in enumerate(zip(self.shape, array.shape)):
            if isinstance(want, str):
                want = dims.setdefault(want, got)
            if want != got:
                raise ContractError(f"{where}: expected {want} on axis {axis} of {self.shape}, got {array.shape}")

    def concrete_shape(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        """The shape with every named axis replaced by its size in `dims`."""
        return tuple(d if isinstance(d, int) else dims[d] for d in self.shape)


@dataclass(frozen=True)
class Contract:
    """The signature of one exported component: its named inputs and outputs."""

    component: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    notes: str = field(default="", compare=False)
    # Outputs compared against thresholds (the safety checker's): engines must compute in fp32, because bf16 moves
    # scores by ~1e-2 and can flip a decision diffusers would make.
    full_precision: bool = False

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Named axes per tensor, in the form torch.onnx.export's `dynamic_axes` takes."""
        return {
            t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            for t in (*self.inputs, *self.outputs)
        }

    def check_inputs(self, feeds: Mapping[str, np.ndarray]) -> dict[str, int]:
        """Validate a feed dict (names, dtypes, shapes); returns the bound dynamic axes."""
        missing = set(self.input_names) - set(feeds)
        extra = set(feeds) - set(self.input_names)
        if missing or extra:
            raise ContractError(
                f"{self.component}: expected inputs {sorted(self.input_names)}, got {sorted(feeds)}"
            )
        dims: dict[str, int] = {}
        for spec in self.inputs:
            spec.bind(np.asarray(feeds[spec.name]), dims, self.component)
        return dims

    def to_dict(self) -> dict:
        d = {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "notes": self.notes,
        }
        return {**d, "full_precision": True} if self.full_precision else d

    @classmethod
    def from_dict(cls, component: str, d: Mapping) -> Contract:
        return cls(
            component,
            tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            d.get("notes", ""),
            d.get("full_precision", False),
        )


def text_encoder_contract(hidden_size: int, max_length: int = 77, *, layers: int) -> Contract:
    """CLIP text encoder: token embeddings -> every layer's hidden states through the final layer norm."""
    return Contract(
        "text_encoder",
        (TensorSpec(TEXT_INPUT, "float32", (BATCH, max_length, hidden_size)),),
        (TensorSpec(TEXT_OUTPUT, "float32", (BATCH, layers, max_length, hidden_size)),),
        "inputs_embeds are token embeddings: the runtime looks ids up in the component's token_embedding table and "
        "puts textual-inversion vectors in place, so one graph serves every embedding. hidden_states[:, -n] is "
        "clip skip n (A1111's CLIP_stop_at_last_layers; diffusers' clip_skip n - 1): layer -n's output through the "
        "final layer norm; -1 is transformers' last_hidden_state. SD2 bundles end at OpenCLIP's penultimate layer",
    )


def legacy_text_encoder_contract(hidden_size: int, max_length: int = 77) -> Contract:
    """The text encoder of bundles written before textual inversion and clip skip: token ids -> the last layer."""
    return Contract(
        "text_encoder",
        (TensorSpec("input_ids", "int32", (BATCH, max_length)),),
        (TensorSpec("last_hidden_state", "float32", (BATCH, max_length, hidden_size)),),
        "input_ids are int32 as in diffusers' ONNX and TensorRT exports",
    )


def unet_contract(in_channels: int, out_channels: int, cross_attention_dim: int) -> Contract:
    """Conditional UNet: one denoising evaluation; `sequence` is dynamic for prompts longer than 77 tokens."""
    return Contract(
        "unet",
        (
            TensorSpec("sample", "float32", (BATCH, in_channels, LATENT_HEIGHT, LATENT_WIDTH)),
            TensorSpec("timestep", "float32", (BATCH,)),
            TensorSpec("encoder_hidden_states", "float32", (BATCH, SEQUENCE, cross_attention_dim)),
        ),
        (TensorSpec("model_output", "float32", (BATCH, out_channels, LATENT_HEIGHT, LATENT_WIDTH)),),
        "timestep is float32 per batch item: k-diffusion samplers evaluate at fractional timesteps",
    )


def vae_decoder_contract(latent_channels: int) -> Contract:
    """VAE decoder: unscaled latents (already divided by the scale factor) -> image in [-1, 1]."""
    return Contract(
        "vae_decoder",
        (TensorSpec("latents", "float32", (BATCH, latent_channels, LATENT_HEIGHT, LATENT_WIDTH)),),
        (TensorSpec("image", "float32", (BATCH, 3, HEIGHT, WIDTH)),),
    )


def vae_encoder_contract(latent_channels: int) -> Contract:
    """VAE encoder: image in [-1, 1] -> mean and std of the latent distribution (unscaled)."""
    return Contract(
        "vae_encoder",
        (TensorSpec("image", "float32", (BATCH, 3, HEIGHT, WIDTH)),),
        (
            TensorSpec("latent_mean", "float32", (BATCH, latent_channels, LATENT_HEIGHT, LATENT_WIDTH)),
            TensorSpec("latent_std", "float32", (BATCH, latent_channels, LATENT_HEIGHT, LATENT_WIDTH)),
        ),
        "sampling (mean + std * noise) happens in the runtime so its noise comes from the seeded generator",
    )


def taesd_decoder_contract(latent_channels: int) -> Contract:
    """Tiny VAE decoder (TAESD): latents on the UNet's scale (not divided by the VAE scale factor) -> image in [-1, 1]."""
    return Contract(
        "taesd_decoder",
        (TensorSpec("latents", "float32", (BATCH, latent_channels, LATENT_HEIGHT, LATENT_WIDTH)),),
        (TensorSpec("image", "float32", (BATCH, 3, HEIGHT, WIDTH)),),
        "TAESD was trained on SD's scaled latents (AutoencoderTiny scaling_factor 1.0): fast previews, --fast-decode",
    )


# diffusers' StableDiffusionSafetyChecker holds 17 concept and 3 special-care embeddings (safety_checker.py).
SAFETY_CONCEPTS, SAFETY_SPECIAL_CONCEPTS = 17, 3


def safety_checker_contract(
    image_size: int, concepts: int = SAFETY_CONCEPTS, special_concepts: int = SAFETY_SPECIAL_CONCEPTS
) -> Contract:
    """Safety checker: CLIP-normalized pixels -> per-concept scores and one NSFW decision per image."""
    return Contract(
        "safety_checker",
        (TensorSpec("clip_input", "float32", (BATCH, 3, image_size, image_size)),),
        (
            TensorSpec("concept_scores", "float32", (BATCH, concepts)),
            TensorSpec("special_scores", "float32", (BATCH, special_concepts)),
            TensorSpec("has_nsfw_concept", "bool", (BATCH,)),
        ),
        "scores are cosine similarity minus the concept's threshold (concept scores plus 0.01 when a special-care "
        "concept scored); a concept counts when its score rounded to 3 decimals is positive, as diffusers' forward. "
        "has_nsfw_concept is bool: a decision, not a number to threshold again (diffusers' forward_onnx is bool too)",
        full_precision=True,
    )
