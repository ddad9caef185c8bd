"""Scale-out on Ray Serve: the same A1111 app as an ingress deployment, and for each served bundle a deployment
whose replicas each hold one pipeline and take one request at a time (max_ongoing_requests=1). Ray queues at most
`queue_size` requests per bundle in front of its replicas and refuses the rest (BackPressureError: a 503 with
Retry-After); a request is routed to the deployment of the bundle it asks for. /progress, /interrupt and /skip
reach the replicas through one small actor (Controls) that replicas report to before every step.

    sdrt serve -b sd15 --ray --replicas 2                      # a local Ray; --address auto: a cluster
    serve run sdrt.server.ray_serve:build bundles=sd15,sd15-inpainting replicas=2   # Ray's own CLI
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass

import ray
from ray import serve
from ray.serve.exceptions import BackPressureError

from sdrt.runtime.pipeline import Pipeline
from sdrt.server.app import create_app
from sdrt.server.auth import parse_credentials
from sdrt.server.catalog import BundleInfo, Catalog
from sdrt.server.jobs import Job, Limits, Output, QueueFull, execute
from sdrt.server.local import wait_or_abandon

log = logging.getLogger(__name__)
APP_NAME = "sdrt"
INGRESS_ONGOING = 1000  # the ingress only waits on replicas; its own limit must not be the bottleneck
RETRY_AFTER_S = 5  # Ray does not say how long its queue will take


@dataclass(frozen=True)
class Scaling:
    """Replicas per bundle: a fixed count, or Ray Serve's autoscaling between min and max replicas."""

    replicas: int = 1
    min_replicas: int = 1
    max_replicas: int | None = None  # set: autoscaling on
    target_ongoing_requests: float = 1.0
    replica_cpus: float = 1.0

    @classmethod
    def from_args(cls, args) -> Scaling:
        return cls(args.replicas, args.min_replicas, args.max_replicas, args.target_ongoing_requests,
                   args.replica_cpus)

    def deployment_options(self, queue_size: int) -> dict:
        """Ray Serve deployment options of a bundle's pipeline replicas."""
        options = {"max_ongoing_requests": 1, "max_queued_requests": queue_size,
                   "ray_actor_options": {"num_cpus": self.replica_cpus}}
        if self.max_replicas is None:
            return {**options, "num_replicas": self.replicas}
        return {**options, "autoscaling_config": {
            "min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests}}


@ray.remote(num_cpus=0)
class Controls:
    """Running jobs' status (for /progress) and the signals /interrupt, /skip and /progress leave for them."""

    def __init__(self):
        self.status: dict[str, dict] = {}
        self.signals: dict[str, dict] = {}

    def report(self, job_id: str, status: dict) -> dict:
        """A replica's status before a step; answers with the signals left for the job since its last report."""
        preview = self.status.get(job_id, {}).get("preview")
        self.status[job_id] = {"preview": preview, **{k: v for k, v in status.items() if v is not None}}
        return self.signals.pop(job_id, {})

    def finish(self, job_id: str) -> None:
        self.status.pop(job_id, None)
        self.signals.pop(job_id, None)

    def latest(self, want_preview: bool) -> dict | None:
        running = [(s["started"], job_id) for job_id, s in self.status.items() if s.get("started")]
        if not running:
            return None
        job_id = max(running)[1]
        if want_preview:
            self.signals.setdefault(job_id, {})["want_preview"] = True
        return self.status[job_id]

    def signal(self, name: str) -> None:
        for job_id in self.status:
            self.signals.setdefault(job_id, {})[name] = True


class PipelineReplica:
    """One pipeline; Serve sends it one request at a time."""

    def __init__(self, path: str, backend: str | None, engine_options: dict):
        self.pipe = Pipeline.load(path, backend=backend, **engine_options)

    async def generate(self, job: Job, job_id: str, controls) -> list[Output]:
        work = asyncio.get_running_loop().run_in_executor(None, self._run, job, job_id, controls)
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:  # the client left: stop at the next step, and only then take the next job
            job.abandoned = True
            await asyncio.wait({work})
            raise

    def _run(self, job: Job, job_id: str, controls) -> list[Output]:
        sent_preview = -1

        def exchange(job: Job) -> None:
            nonlocal sent_preview
            status = job.status()
            if job.preview_step == sent_preview:
                status["preview"] = None  # unchanged: not sent again
            sent_preview = job.preview_step
            job.apply(ray.get(controls.report.remote(job_id, status)))

        try:
            return execute(self.pipe, job, exchange)
        finally:
            controls.finish.remote(job_id)


class RayService:
    """The Service the ingress's app runs on: a DeploymentHandle per bundle, and the Controls actor."""

    def __init__(self, catalog: Catalog, handles: dict, controls):
        self.catalog, self.handles, self.controls = catalog, handles, controls

    async def generate(self, bundle: BundleInfo, job: Job, disconnected) -> list[Output]:
        response = self.handles[bundle.name].generate.remote(job, uuid.uuid4().hex, self.controls)
        try:
            return await wait_or_abandon(response, disconnected, response.cancel)
        except BackPressureError as e:
            raise QueueFull(str(e), RETRY_AFTER_S) from None

    async def status(self, want_preview: bool) -> dict | None:
        return await self.controls.latest.remote(want_preview)

    async def interrupt(self) -> None:
        await self.controls.signal.remote("interrupted")

    async def skip(self) -> None:
        await self.controls.signal.remote("skipped")

    def close(self) -> None:
        """Replicas belong to Serve: nothing to close here."""


@serve.ingress()
class Ingress:
    """The A1111 app, built on the replica (`__serve_build_asgi_app__`) around handles to the pipeline replicas."""

    def __init__(self, paths: list[str], handles: dict, limits: Limits, credentials: dict | None):
        self.service = RayService(Catalog.from_paths(paths), handles, Controls.remote())
        self.limits, self.credentials = limits, credentials

    def __serve_build_asgi_app__(self):
        return create_app(self.service, self.limits, self.credentials)


def application(catalog: Catalog, backend: str | None, engine_options: dict, limits: Limits,
                credentials: dict | None, scaling: Scaling):
    """The Serve application: the ingress, and one deployment of pipeline replicas per bundle."""
    replica = serve.deployment(PipelineReplica)
    handles = {
        bundle.name: replica.options(name=f"pipeline-{bundle.name}", **scaling.deployment_options(limits.queue_size))
        .bind(str(bundle.path), backend, engine_options)
        for bundle in catalog.bundles
    }
    ingress = serve.deployment(Ingress, name="a1111", max_ongoing_requests=INGRESS_ONGOING,
                               ray_actor_options={"num_cpus": 0})
    return ingress.bind([str(b.path) for b in catalog.bundles], handles, limits, credentials)


def build(args: dict):
    """`serve run sdrt.server.ray_serve:build bundles=A,B replicas=2 queue_size=4 api_auth=user:pass` (Ray's CLI;
    also max_replicas, min_replicas, target_ongoing_requests, replica_cpus, backend, threads)."""
    paths = [p for p in str(args.get("bundles", "")).split(",") if p]
    scaling = Scaling(replicas=int(args.get("replicas", 1)), min_replicas=int(args.get("min_replicas", 1)),
                      max_replicas=int(args["max_replicas"]) if "max_replicas" in args else None,
                      target_ongoing_requests=float(args.get("target_ongoing_requests", 1.0)),
                      replica_cpus=float(args.get("replica_cpus", 1.0)))
    limits = Limits(queue_size=int(args.get("queue_size", Limits.queue_size)))
    credentials = parse_credentials(args["api_auth"]) if args.get("api_auth") else None
    engine = {"threads": int(args["threads"])} if "threads" in args else {}
    return application(Catalog.from_paths(paths or None), args.get("backend"), engine, limits, credentials, scaling)


def connect(address: str | None) -> None:
    """Join the Ray cluster at `address` ("auto": the one `ray start` began here), or start a local Ray (None)."""
    ray.init(address=address, log_to_driver=False)


def deploy(catalog: Catalog, backend: str | None, engine_options: dict, limits: Limits, credentials: dict | None,
           host: str, port: int, scaling: Scaling) -> None:
    """Run the application behind Ray's HTTP proxy on host:port; returns once every replica is up."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(catalog, backend, engine_options, limits, credentials, scaling), name=APP_NAME,
              route_prefix="/")


def stop() -> None:
    """Remove the application and leave Ray (a local Ray that `start` began stops with it)."""
    if ray.is_initialized():
        serve.delete(APP_NAME)
        ray.shutdown()
