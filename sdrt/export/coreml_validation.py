"""Checks of a Core ML export that run without Core ML: each rewritten torch module against diffusers' original (on
the activations a real forward pass feeds it, and on random ones), the component as a whole, and the traced graph
at every exported shape. Apple's torch2coreml.py `report_correctness` is the model: signal PSNR, 35 dB minimum."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from sdrt.errors import ExportError
from sdrt.export.coreml_rewrites import ConvAttention, ConvSpatialSelfAttention, ConvSpatialTransformer

log = logging.getLogger(__name__)

# ml-stable-diffusion's ABSOLUTE_MIN_PSNR (torch2coreml.py): the bar every conversion step must clear.
MIN_PSNR_DB = 35.0
VALIDATION_SEED = 0


def signal_psnr(reference: np.ndarray, candidate: np.ndarray) -> float:
    """PSNR of `candidate` against `reference` with the reference's peak magnitude as the signal (dB; inf: equal).

    Apple's compute_psnr, with the reference's peak rather than the candidate's so a broken candidate cannot
    raise its own bar.
    """
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if reference.shape != candidate.shape:
        raise ExportError(f"expected shape {reference.shape}, got {candidate.shape}")
    rmse = float(np.sqrt(np.mean((reference - candidate) ** 2)))
    if not np.isfinite(rmse):
        return float("-inf")
    peak = float(np.max(np.abs(reference)))
    return float("inf") if rmse == 0 else 20 * float(np.log10((peak + 1e-5) / rmse))


def bc1s(x: torch.Tensor) -> torch.Tensor:
    """(batch, sequence, channels) -> (batch, channels, 1, sequence)."""
    return x.transpose(1, 2).unsqueeze(2)


def bsc(x: torch.Tensor) -> torch.Tensor:
    """(batch, channels, 1, sequence) -> (batch, sequence, channels)."""
    return x.squeeze(2).transpose(1, 2)


@dataclass(frozen=True)
class Pair:
    """A diffusers module and its rewrite, what kind of rewrite it is, and how each is called on the same input."""

    name: str
    kind: str
    original: nn.Module
    rewritten: nn.Module
    # (module, original-layout args, kwargs) -> output in the original layout
    call_original: Callable
    call_rewritten: Callable


def _plain(module, args, kwargs):
    out = module(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _on_sequence(module, args, kwargs):
    """Call a (batch, channels, 1, sequence) module on (batch, sequence, channels) inputs; the context too."""
    context = kwargs.get("encoder_hidden_states")
    extra = (bc1s(context),) if context is not None and isinstance(module, ConvAttention) else ()
    return bsc(module(bc1s(args[0]), *extra))


def _linear_pairs(prefix: str, original: nn.Module, rewritten: nn.Module, names: list[tuple[str, str]]) -> list[Pair]:
    pairs = []
    for old, new in names:
        linear, conv = original.get_submodule(old), rewritten.get_submodule(new)
        if isinstance(linear, nn.Linear):
            pairs.append(Pair(f"{prefix}.{old}", "linear as 1x1 conv", linear, conv, _plain, _on_sequence))
    return pairs


def _attention_pairs(prefix: str, original: nn.Module, rewritten: ConvAttention) -> list[Pair]:
    linears = [(n, n) for n in ("to_q", "to_k", "to_v")] + [("to_out.0", "to_out")]
    return [Pair(prefix, "attention", original, rewritten, _plain, _on_sequence),
            *_linear_pairs(prefix, original, rewritten, linears)]


def _block_pairs(prefix: str, original: nn.Module, rewritten: nn.Module) -> list[Pair]:
    pairs = []
    for attn in ("attn1", "attn2"):
        pairs += _attention_pairs(f"{prefix}.{attn}", getattr(original, attn), getattr(rewritten, attn))
    for norm in ("norm1", "norm2", "norm3"):
        pairs.append(Pair(f"{prefix}.{norm}", "layer norm", getattr(original, norm), getattr(rewritten, norm),
                          _plain, _on_sequence))
    pairs.append(Pair(f"{prefix}.ff", "feed-forward", original.ff, rewritten.ff, _plain, _on_sequence))
    return pairs + _linear_pairs(f"{prefix}.ff", original.ff, rewritten.ff, [("net.0.proj", "proj"), ("net.2", "out")])


def module_pairs(original: nn.Module, rewritten: nn.Module) -> list[Pair]:
    """Every rewritten module of `rewritten` (a rewrite_unet / rewrite_vae result) with its original in `original`."""
    pairs = []
    for name, module in rewritten.named_modules():
        if isinstance(module, ConvSpatialTransformer):
            source = original.get_submodule(name)
            pairs.append(Pair(name, "spatial transformer", source, module, _plain, _plain))
            pairs += _linear_pairs(name, source, module, [("proj_in", "proj_in"), ("proj_out", "proj_out")])
            for i, block in enumerate(module.blocks):
                pairs += _block_pairs(f"{name}.transformer_blocks.{i}", source.transformer_blocks[i], block)
        elif isinstance(module, ConvSpatialSelfAttention):
            source = original.get_submodule(name)
            pairs.append(Pair(name, "VAE attention", source, module, _plain, _plain))
            pairs += _linear_pairs(name, source, module.attention,
                                   [(n, n) for n in ("to_q", "to_k", "to_v")] + [("to_out.0", "to_out")])
    return pairs


def check_rewrites(original: nn.Module, rewritten: nn.Module, run_original: Callable[[], None]) -> dict:
    """Each rewritten module against its original on the inputs `run_original` (a forward pass of the original
    component) feeds it ("real") and on standard normal inputs of the same shapes ("random"); raises ExportError
    below MIN_PSNR_DB. Returns, per kind of rewrite, how many modules were checked and the lowest PSNR of each."""
    pairs = module_pairs(original, rewritten)
    captured = _capture_inputs([p.original for p in pairs], run_original)
    generator = torch.Generator().manual_seed(VALIDATION_SEED)
    record: dict[str, dict] = {}
    for pair in pairs:
        if id(pair.original) not in captured:
            raise ExportError(f"{pair.name}: the forward pass never reached this {pair.kind}, so it is unchecked")
        args, kwargs = captured[id(pair.original)]
        real = _pair_psnr(pair, args, kwargs)
        random = _pair_psnr(pair, *_randomized(args, kwargs, generator))
        entry = record.setdefault(pair.kind, {"modules": 0, "min_psnr_db_real": np.inf, "min_psnr_db_random": np.inf})
        entry["modules"] += 1
        entry["min_psnr_db_real"] = min(entry["min_psnr_db_real"], real)
        entry["min_psnr_db_random"] = min(entry["min_psnr_db_random"], random)
        if not min(real, random) >= MIN_PSNR_DB:
            raise ExportError(f"{pair.name}: the Core ML form of this {pair.kind} is {min(real, random):.1f} dB PSNR "
                              f"from diffusers' module, below the minimum of {MIN_PSNR_DB:g} dB")
    return {kind: {k: v if k == "modules" else _rounded(v) for k, v in entry.items()} for kind, entry in record.items()}


def _capture_inputs(modules: list[nn.Module], run: Callable[[], None]) -> dict[int, tuple[tuple, dict]]:
    """The (args, kwargs) of each module's first call while `run` executes."""
    captured: dict[int, tuple[tuple, dict]] = {}

    def hook(module, args, kwargs):
        captured.setdefault(id(module), (args, dict(kwargs)))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _randomized(args: tuple, kwargs: dict, generator: torch.Generator) -> tuple[tuple, dict]:
    def draw(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return torch.randn(value.shape, generator=generator, dtype=value.dtype)
        return value

    return tuple(draw(a) for a in args), {k: draw(v) for k, v in kwargs.items()}


def _pair_psnr(pair: Pair, args: tuple, kwargs: dict) -> float:
    with torch.no_grad():
        want = pair.call_original(pair.original, args, kwargs)
        got = pair.call_rewritten(pair.rewritten, args, kwargs)
    return signal_psnr(want.numpy(), got.numpy())


def torch_outputs(module: nn.Module | torch.jit.ScriptModule, inputs: list[tuple]) -> list[tuple[np.ndarray, ...]]:
    """The module's outputs (as numpy) for each tuple of inputs."""
    out = []
    with torch.no_grad():
        for args in inputs:
            result = module(*args)
            out.append(tuple(t.numpy() for t in (result if isinstance(result, tuple) else (result,))))
    return out


def check_outputs(name: str, what: str, expected: list[tuple], got: list[tuple]) -> float:
    """The lowest PSNR over matching outputs (bool outputs must be equal); ExportError below MIN_PSNR_DB."""
    worst = np.inf
    for want_outputs, got_outputs in zip(expected, got, strict=True):
        for want, have in zip(want_outputs, got_outputs, strict=True):
            want, have = np.asarray(want), np.asarray(have)
            if want.dtype == np.bool_:
                value = np.inf if np.array_equal(want, have.astype(bool)) else -np.inf
            else:
                value = signal_psnr(want, have)
            worst = min(worst, value)
    if not worst >= MIN_PSNR_DB:
        raise ExportError(f"{name}: {what} is {worst:.1f} dB PSNR from the torch module, below the minimum of "
                          f"{MIN_PSNR_DB:g} dB")
    return _rounded(worst)


def _rounded(value: float) -> float | None:
    """dB for the manifest: 2 decimals, None for identical (inf), as the image gate records it."""
    return round(float(value), 2) if np.isfinite(value) else None
