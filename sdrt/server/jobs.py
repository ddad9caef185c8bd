"""Load control: per-request limits checked before any work, and a Lane per loaded pipeline that runs one
generation at a time behind a bounded queue, with A1111's skip and interrupt and abandonment of jobs whose client
went away. Everything a worker thread and the event loop share is behind the lane's lock or set once."""
from __future__ import annotations

import json
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from PIL import Image

from sdrt.errors import RequestError, SdrtError
from sdrt.runtime.driver import INTERRUPT, SKIP, Progress, run
from sdrt.runtime.outputs import encode
from sdrt.runtime.pipeline import Step
from sdrt.runtime.request import GenerationRequest


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; anything beyond is a 422 before any work is done."""

    max_pixels: int = 1024 * 1024  # width x height of one generated image
    max_steps: int = 150  # A1111's UI slider maximum
    max_images: int = 16  # batch_size x n_iter
    max_prompt_chars: int = 20_000  # prompt and negative prompt, each
    max_body_bytes: int = 32 * 2**20  # the whole JSON body (init images and masks included)
    max_input_pixels: int = 4096 * 4096  # each decoded init image or mask
    queue_size: int = 4  # jobs waiting per pipeline beside the running one; more: 503

    def check(self, req: GenerationRequest) -> None:
        """Refuse what exceeds a limit; unset fields (None) are checked again once the bundle has filled them."""
        for what, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt)):
            texts = [text] if isinstance(text, str) else list(text)
            longest = max((len(t) for t in texts if isinstance(t, str)), default=0)
            if longest > self.max_prompt_chars:
                raise RequestError(f"{what}: at most {self.max_prompt_chars} characters, got {longest}")
        if _int(req.width) and _int(req.height) and req.width * req.height > self.max_pixels:
            raise RequestError(f"width x height: at most {self.max_pixels} pixels, got {req.width}x{req.height}")
        if _int(req.steps) and req.steps > self.max_steps:
            raise RequestError(f"steps: at most {self.max_steps}, got {req.steps}")
        if _int(req.batch_size) and _int(req.n_iter) and req.batch_size * req.n_iter > self.max_images:
            raise RequestError(f"batch_size x n_iter: at most {self.max_images} images, got "
                               f"{req.batch_size}x{req.n_iter}")


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class QueueFull(SdrtError):
    """The pipeline's queue is full; try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Abandoned(SdrtError):
    """The client went away: the job stops at its next step and nothing is decoded."""


@dataclass(frozen=True)
class Output:
    """One finished image, encoded: the bytes sent, its seed, parameters text and safety flag."""

    data: bytes
    seed: int
    parameters: str
    nsfw: bool = False


@dataclass
class Job:
    """A resolved request on its way through a lane, with the controls A1111's buttons set."""

    request: GenerationRequest
    image_format: str = "PNG"
    preview_every: int = 0  # A1111's show_progress_every_n_steps; 0 or less: no previews
    label: str = "txt2img"
    created: float = field(default_factory=time.time)
    started: float | None = None
    progress: Progress | None = None
    skipped: bool = False
    interrupted: bool = False
    abandoned: bool = False
    preview: bytes | None = None  # the latest preview, PNG
    preview_step: int = -1
    want_preview: bool = False  # set by /progress: previews cost a decode, so only when someone looks

    def on_step(self, progress: Progress, preview: Callable[[Step], list[Image.Image]]) -> str | None:
        """The driver's step hook (worker thread); `preview` pictures a step when a /progress asked for one."""
        if self.abandoned:
            raise Abandoned("the client disconnected")
        self.progress = progress
        self._maybe_preview(progress, preview)
        if self.interrupted:
            return INTERRUPT
        if self.skipped:
            self.skipped = False  # A1111 skips the current image only
            return SKIP
        return None

    def apply(self, signals: dict[str, bool]) -> None:
        """Set the controls another process signalled ("interrupted", "skipped", "abandoned", "want_preview")."""
        for name in ("interrupted", "skipped", "abandoned", "want_preview"):
            if signals.get(name):
                setattr(self, name, True)

    def status(self) -> dict:
        """Plain data for GET /sdapi/v1/progress (sdrt.server.a1111.progress)."""
        p = self.progress
        return {
            "label": self.label, "created": self.created, "started": self.started,
            "fraction": p.fraction if p else 0.0, "iteration": p.iteration if p else 0,
            "iterations": p.iterations if p else self.request.n_iter, "step": p.step if p else 0,
            "steps": p.steps if p else 0, "skipped": self.skipped, "interrupted": self.interrupted,
            "preview": self.preview,
        }

    def _maybe_preview(self, progress: Progress, preview: Callable[[Step], list[Image.Image]]) -> None:
        done = progress.iteration * progress.steps + progress.step
        if self.want_preview and self.preview_every > 0 and done - self.preview_step >= self.preview_every:
            self.preview_step, self.want_preview = done, False
            self.preview = encode(preview(progress.state)[0], "PNG", "")


def execute(pipe, job: Job, before_step: Callable[[Job], None] | None = None) -> list[Output]:
    """Run a job on a pipeline through the generation driver to its encoded images (a worker thread's work);
    `before_step` runs before each step's controls are read (Ray replicas exchange them with the ingress)."""
    if job.abandoned:
        raise Abandoned("the client disconnected while the job was queued")
    job.started = time.time()

    def hook(progress: Progress) -> str | None:
        if before_step is not None:
            before_step(job)
        return job.on_step(progress, pipe.preview)

    return [Output(encode(out.image, job.image_format, out.parameters), out.seed, out.parameters, out.nsfw)
            for out in run(pipe, job.request, hook)]


class Lane:
    """One loaded pipeline: one generation at a time on its own thread, at most `queue_size` waiting."""

    def __init__(self, pipe, queue_size: int):
        self.pipe, self.queue_size = pipe, queue_size
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdrt-lane")
        self._lock = threading.Lock()
        self._pending = 0  # queued + running
        self.running: Job | None = None
        self._mean_seconds = 1.0  # moving average of job durations, for Retry-After

    def submit(self, job: Job) -> Future:
        """Queue a job, or raise QueueFull at once."""
        with self._lock:
            if self._pending > self.queue_size:
                raise QueueFull(f"the queue is full ({self.queue_size} waiting)", self._retry_after())
            self._pending += 1
        future = self._executor.submit(self._run, job)
        future.add_done_callback(self._release)
        return future

    def _retry_after(self) -> int:
        return max(1, math.ceil(self._mean_seconds * self._pending))

    def _release(self, _future: Future) -> None:
        with self._lock:
            self._pending -= 1

    def _run(self, job: Job) -> list[Output]:
        self.running = job
        try:
            return execute(self.pipe, job)
        finally:
            self.running = None
            if job.started is not None:
                self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * (time.time() - job.started)

    def close(self) -> None:
        """Stop the worker: the running job is abandoned at its next step, queued ones are cancelled."""
        if self.running is not None:
            self.running.abandoned = True
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.pipe.close()


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is refused (422) before the app reads any of it; bodies
    without a Content-Length are counted as they arrive. The body is held in memory (FastAPI would hold it too)
    and replayed to the app, whose later receive() calls (client disconnects) go to the server as usual."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            return await self._refuse(send, length.decode("latin-1"))
        chunks, size, message = [], 0, {"more_body": True}
        while message.get("more_body"):
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body: nothing to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(send, f"more than {self.max_bytes}")
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, send, got: str) -> None:
        detail = f"request body: at most {self.max_bytes} bytes, got {got}"
        body = json.dumps({"error": "RequestError", "detail": detail, "body": "", "errors": detail}).encode()
        await send({"type": "http.response.start", "status": 422, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
