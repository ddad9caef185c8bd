"""Never a silent black image: a component whose output holds NaN or inf is re-run in fp32, or refused.

fp16 overflows where fp32 does not (65504 is its largest value: SD VAE decoders are known to reach it, which is
why diffusers ships `force_upcast` for some VAEs), and a NaN that reaches the image decodes to black. Any engine
that computes in reduced precision (torch fp16/bf16, TensorRT fp16) wraps its sessions in `Fp32Fallback` with a
way to open the same component in fp32.
"""
from __future__ import annotations

import logging
from typing import Callable, Mapping

import numpy as np

from sdrt.backends.base import Session
from sdrt.errors import BackendError

log = logging.getLogger(__name__)


def nonfinite(outputs: Mapping[str, np.ndarray]) -> list[str]:
    """Names of the floating-point outputs holding NaN or inf."""
    return [name for name, value in outputs.items()
            if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all()]


class Fp32Fallback:
    """A session whose outputs are checked for NaN and inf. With `fp32` (opens the component in fp32), such an output
    is computed again in fp32, with a warning, and the component stays in fp32 for the rest of the session; without
    it (the session is fp32 already), it raises BackendError."""

    def __init__(self, session: Session, fp32: Callable[[], Session] | None, precision: str):
        self.contract = session.contract
        self._active, self._fp32, self._precision = session, fp32, precision
        self._dims: dict[str, int] | None = None
        self._weights: dict[str, np.ndarray] = {}

    @property
    def precision(self) -> str:
        """What the component computes in now."""
        return self._precision

    def prepare(self, dims: Mapping[str, int]) -> None:
        self._dims = dict(dims)
        self._active.prepare(dims)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self._active.run(feeds)
        bad = nonfinite(outputs)
        if not bad:
            return outputs
        if self._fp32 is None:
            raise BackendError(f"{self.contract.component}: {', '.join(bad)} holds NaN or inf in {self._precision}: "
                               "refusing to pass it on (it would decode to a black image)")
        log.warning("%s: %s holds NaN or inf in %s; computing it again in fp32, and in fp32 from now on",
                    self.contract.component, ", ".join(bad), self._precision)
        self._switch_to_fp32()
        return self.run(feeds)

    def _switch_to_fp32(self) -> None:
        fp32, self._fp32 = self._fp32(), None
        if self._weights:
            fp32.update_weights(self._weights)
        self._active.close()
        self._active, self._precision = fp32, "f32"
        if self._dims is not None:
            fp32.prepare(self._dims)

    def update_weights(self, values: Mapping[str, np.ndarray]) -> None:
        """Replace weights (for sessions that take replacements, by torch parameter name), in the fp32 session
        too should it be opened later."""
        self._active.update_weights(values)
        self._weights.update(values)

    def close(self) -> None:
        self._active.close()
