"""The single-machine service: every served bundle loaded in this process, each in its own Lane."""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from sdrt.runtime.pipeline import Pipeline
from sdrt.server.catalog import BundleInfo, Catalog
from sdrt.server.jobs import Abandoned, Job, Lane, Output

log = logging.getLogger(__name__)
DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there


async def wait_or_abandon(pending: Awaitable, disconnected: Callable[[], Awaitable[bool]],
                          abandon: Callable[[], None]):
    """The result of `pending`, or Abandoned (after calling `abandon`) once the client has gone away."""
    task = asyncio.ensure_future(pending)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # an abandoned job's error is expected
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await disconnected():
                raise Abandoned("the client disconnected")
    except (Abandoned, asyncio.CancelledError):  # cancelled: the server (or Ray's proxy) dropped the request
        abandon()
        raise


class LocalService:
    """Pipelines in this process, one Lane each; /progress, /interrupt and /skip act on the running jobs."""

    def __init__(self, catalog: Catalog, queue_size: int, backend: str | None = None, **engine_options):
        self.catalog = catalog
        self.lanes: dict[str, Lane] = {}
        try:
            for bundle in catalog.bundles:
                log.info("loading %s from %s", bundle.title, bundle.path)
                pipe = Pipeline.load(bundle.path, backend=backend, **engine_options)
                self.lanes[bundle.title] = Lane(pipe, queue_size)
        except BaseException:
            self.close()
            raise

    async def generate(self, bundle: BundleInfo, job: Job, disconnected: Callable[[], Awaitable[bool]]
                       ) -> list[Output]:
        future = self.lanes[bundle.title].submit(job)

        def abandon() -> None:
            job.abandoned = True
            future.cancel()

        return await wait_or_abandon(asyncio.wrap_future(future), disconnected, abandon)

    def _running(self) -> list[Job]:
        return [lane.running for lane in self.lanes.values() if lane.running is not None]

    async def status(self, want_preview: bool) -> dict | None:
        """The most recently started running job's status (A1111 has one job at a time; sdrt one per bundle)."""
        jobs = sorted(self._running(), key=lambda job: job.started or 0)
        if not jobs:
            return None
        jobs[-1].want_preview = jobs[-1].want_preview or want_preview
        return jobs[-1].status()

    async def interrupt(self) -> None:
        for job in self._running():
            job.interrupted = True

    async def skip(self) -> None:
        for job in self._running():
            job.skipped = True

    def close(self) -> None:
        for lane in self.lanes.values():
            lane.close()
