"""The generation driver: request -> resolved request -> denoise -> decode -> finish, for each of the request's
iterations. The CLI, the Python API and the HTTP server all run this one path, so post-processing (paste-back,
safety checker, watermark, parameters) cannot be skipped by one of them, and a step hook is the only way in.

A hook sees a `Progress` after every model evaluation and may return `SKIP` (end this iteration early and go
on with the next: its latents are decoded as they are) or `INTERRUPT` (the same, then stop), which is what
A1111's Skip and Interrupt buttons do (modules/processing.py: the sampler stops, the partial result is decoded).
Raising from a hook abandons the run without decoding anything (a client that went away).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

from sdrt.runtime.request import GenerationRequest
from sdrt.runtime.samplers import step_count

if TYPE_CHECKING:
    from sdrt.runtime.pipeline import GeneratedImage, Pipeline, Step

SKIP, INTERRUPT = "skip", "interrupt"


@dataclass(frozen=True)
class Progress:
    """Where a run is: sampler steps (not model calls) done of this iteration, and the loop's state."""

    iteration: int  # 0-based, of `iterations` batches run one after another (A1111's n_iter)
    iterations: int
    step: int  # sampler steps done: two-stage samplers (Heun, DPM2...) call the model twice per step
    steps: int
    state: Step  # latents and noise level after this model call (previews)

    @property
    def fraction(self) -> float:
        """How much of the whole run is done, in [0, 1]."""
        return (self.iteration + self.step / max(self.steps, 1)) / self.iterations


StepHook = Callable[[Progress], "str | None"]


def run(pipe: Pipeline, request: GenerationRequest, on_step: StepHook | None = None) -> Iterator[GeneratedImage]:
    """Generate `request` on `pipe`, yielding each finished image as its batch completes (seeds continue across
    iterations: iteration k of batch size b starts at seed + k * b, as A1111's n_iter)."""
    req = request.resolve(pipe.manifest)
    for iteration, batch in enumerate(req.iterations()):
        latents, control = _denoise(pipe, batch, iteration, req.n_iter, on_step)
        yield from pipe.finish(batch, pipe.decode(latents, fast=batch.fast_decode))
        if control == INTERRUPT:
            return


def _denoise(pipe: Pipeline, req: GenerationRequest, iteration: int, iterations: int, on_step: StepHook | None):
    """(VP latents of the last step taken, the hook's last word) for one resolved batch."""
    steps, done = step_count(req.sampler, pipe.schedule(req).steps)
    state, control = None, None
    for state in pipe.denoise(req):
        control = on_step(Progress(iteration, iterations, done(state.index), steps, state)) if on_step else None
        if control in (SKIP, INTERRUPT):
            break
    return state.vp_latents(), control
