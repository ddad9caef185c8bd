"""Reduced precision on any engine: which file of a component it runs, and a guard that re-runs a component in
fp32 when its reduced-precision outputs hold a NaN or an inf.

fp16 overflows at 65504. A graph that is fine on one model can overflow on another (SD 1.x's VAE decoder in fp16
is the known case: A1111 ships `--no-half-vae` and `auto_vae_precision`, and SDXL needed a re-trained VAE), and an
overflow turns the image black or into noise without an error. So every reduced-precision session is wrapped in
`PrecisionFallback`: a non-finite output makes it open the component's fp32 file, re-run the same call there and
stay on fp32, as A1111's `auto_vae_precision` does for the VAE (modules/processing.py, `decode_latent_batch`: on a
NansException the VAE is converted to fp32 and the batch decoded again). The pipeline writes what fell back into
the image's parameters (`fallback_notes`).
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Mapping

import numpy as np

from sdrt.backends.base import Session
from sdrt.bundle import Component
from sdrt.errors import BackendError

log = logging.getLogger(__name__)

FULL = "fp32"
# An engine's `precision` option (OpenVINO's spelling, as the CLI's --precision) -> the manifest's precision names.
PRECISIONS = {"f16": "fp16", "f32": FULL}


def resolve_precision(precision: str, engine: str, reduced: str = "fp16", *, gpu: bool) -> str:
    """The manifest precision an engine runs: 'auto' is `reduced` on a GPU (its fp16 units are 2-16x its fp32
    rate) and fp32 elsewhere; 'f16' and 'f32' as named."""
    if precision == "auto":
        return reduced if gpu else FULL
    if precision not in PRECISIONS:
        raise BackendError(f"{engine}: unknown precision {precision!r}; choose one of: auto, {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def model_file(component: Component, precision: str) -> tuple[str, str]:
    """(file, precision) an engine opens for `component`: the bundle's variant in `precision` when it has one,
    else the component's own file. Components compared against thresholds (`full_precision`) always run fp32."""
    if precision == component.precision or component.contract.full_precision:
        return component.file, component.precision
    variant = component.variants.get(precision)
    if variant is None:
        log.debug("%s: the bundle has no %s variant, running its %s graph (sdrt convert --target tensorrt adds fp16 "
                  "variants)", component.name, precision, component.precision)
        return component.file, component.precision
    return variant.file, variant.precision


def all_finite(outputs: Mapping[str, np.ndarray]) -> bool:
    """Whether every float output is free of NaN and inf (integer and bool outputs cannot overflow)."""
    return all(np.isfinite(v).all() for v in outputs.values() if np.issubdtype(v.dtype, np.floating))


class PrecisionFallback:
    """A reduced-precision session that, on a non-finite output, re-runs the call on the component's fp32 session
    (opened then, with the last prepared dims) and keeps using it; `note` says what happened, for the parameters."""

    def __init__(self, session: Session, open_full: Callable[[], Session], precision: str):
        self.contract, self.precision = session.contract, precision
        self._session, self._open_full = session, open_full
        self._dims: dict[str, int] = {}
        self.note: str | None = None

    def prepare(self, dims: Mapping[str, int]) -> None:
        self._dims = dict(dims)
        self._session.prepare(dims)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self._session.run(feeds)
        if all_finite(outputs):
            return outputs
        name = self.contract.component
        if self.note is not None:
            raise BackendError(f"{name}: outputs are not finite in {FULL} either (inputs finite: {all_finite(feeds)})")
        log.warning("%s: %s outputs hold NaN or inf; running it in %s from now on", name, self.precision, FULL)
        self._switch()
        return self.run(feeds)

    def _switch(self) -> None:
        full = self._open_full()
        full.prepare(self._dims)
        self._session.close()
        self._session = full
        self.note = f"{self.contract.component} {FULL} ({self.precision} gave NaN/inf)"

    def close(self) -> None:
        self._session.close()


def fallback_notes(sessions: Iterable[Session]) -> str | None:
    """What fell back to fp32 among `sessions`, for an image's parameters; None when nothing did."""
    notes = [s.note for s in sessions if isinstance(s, PrecisionFallback) and s.note]
    return ", ".join(notes) or None


def guarded(session: Session, precision: str, open_full: Callable[[], Session]) -> Session:
    """`session` wrapped in PrecisionFallback when it computes below fp32; fp32 sessions are returned as they are."""
    return session if precision == FULL else PrecisionFallback(session, open_full, precision)
