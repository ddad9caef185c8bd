"""The FastAPI app speaking AUTOMATIC1111's API (modules/api/api.py) over a service that runs the jobs: pipelines
in this process (sdrt.server.local) or Ray Serve replicas (sdrt.server.ray). A thin layer: A1111's shapes are in
sdrt.server.a1111, the queue and limits in sdrt.server.jobs, the generation in sdrt.runtime.driver."""
from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable, Protocol

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from sdrt import __version__
from sdrt.errors import RequestError, SdrtError
from sdrt.server import a1111
from sdrt.server.auth import BasicAuth
from sdrt.server.catalog import BundleInfo, Catalog
from sdrt.server.codec import parameters_text, parse_parameters, to_base64
from sdrt.server.jobs import Abandoned, BodyLimit, Job, Limits, Output, QueueFull
from sdrt.server.models import (
    GenerationFields, GenerationResponse, Img2ImgRequest, PNGInfoRequest, PNGInfoResponse, ProgressResponse,
    SamplerItem, SchedulerItem, ScriptsList, SDModelItem, Txt2ImgRequest,
)
from sdrt.server.options import Options

log = logging.getLogger(__name__)
API = "/sdapi/v1"
CLIENT_GONE = 499  # nginx's "client closed request": logged, never read by anyone


class Service(Protocol):
    """Where jobs run: one generation at a time per loaded pipeline, a bounded queue in front of each."""

    catalog: Catalog

    async def generate(self, bundle: BundleInfo, job: Job, disconnected: Callable[[], Awaitable[bool]]
                       ) -> list[Output]: ...

    async def status(self, want_preview: bool) -> dict | None: ...

    async def interrupt(self) -> None: ...

    async def skip(self) -> None: ...

    def close(self) -> None: ...


def create_app(service: Service, limits: Limits = Limits(), credentials: dict[str, str] | None = None):
    """The ASGI app: A1111's routes on `service`, behind Basic auth (when `credentials`) and the body limit."""
    app = FastAPI(title="sdrt", version=__version__, description="AUTOMATIC1111's API on sdrt bundles")
    options = Options(service.catalog)
    _add_error_handlers(app)
    _add_generation_routes(app, service, options, limits)
    _add_info_routes(app, service, options)
    app.state.service, app.state.options = service, options
    guarded = BodyLimit(app, limits.max_body_bytes)
    return BasicAuth(guarded, credentials) if credentials else guarded


def _add_generation_routes(app: FastAPI, service: Service, options: Options, limits: Limits) -> None:
    async def generate(body: GenerationFields, work: a1111.Work, request: Request) -> dict:
        limits.check(work.request)  # what the client set, before the bundle fills the rest
        bundle = work.settings.bundle
        req = await run_in_threadpool(work.request.resolve, bundle.manifest)
        limits.check(req)
        if body.override_settings and body.override_settings_restore_afterwards is False:
            options.update(body.override_settings)  # A1111 keeps such overrides as the new settings
        job = Job(req, work.settings.image_format, work.settings.preview_every, work.label)
        outputs = await service.generate(bundle, job, request.is_disconnected)
        return {"images": [to_base64(out.data) for out in outputs] if body.send_images is not False else [],
                "parameters": a1111.echo(body), "info": a1111.info(work, req, outputs, bundle, job.created)}

    @app.post(f"{API}/txt2img", response_model=GenerationResponse)
    async def txt2img(body: Txt2ImgRequest, request: Request):
        return await generate(body, a1111.txt2img(body, options.settings(body.override_settings)), request)

    @app.post(f"{API}/img2img", response_model=GenerationResponse)
    async def img2img(body: Img2ImgRequest, request: Request):
        settings = options.settings(body.override_settings)
        work = await run_in_threadpool(a1111.img2img, body, settings, limits.max_input_pixels)
        return await generate(body, work, request)

    @app.get(f"{API}/progress", response_model=ProgressResponse)
    async def progress(skip_current_image: bool = False):
        return a1111.progress(await service.status(not skip_current_image), skip_current_image)

    @app.post(f"{API}/interrupt")
    async def interrupt():
        await service.interrupt()
        return {}

    @app.post(f"{API}/skip")
    async def skip():
        await service.skip()


def _add_info_routes(app: FastAPI, service: Service, options: Options) -> None:
    @app.get(f"{API}/samplers", response_model=list[SamplerItem])
    async def samplers():
        return a1111.samplers()

    @app.get(f"{API}/schedulers", response_model=list[SchedulerItem])
    async def schedulers():
        return a1111.schedulers()

    @app.get(f"{API}/sd-models", response_model=list[SDModelItem])
    async def sd_models():
        return [bundle.item() for bundle in service.catalog.bundles]

    @app.get(f"{API}/options")
    async def get_options():
        return options.get()

    @app.post(f"{API}/options")
    async def set_options(changes: dict[str, Any]):
        options.update(changes)

    @app.post(f"{API}/png-info", response_model=PNGInfoResponse)
    async def png_info(body: PNGInfoRequest):
        text, items = await run_in_threadpool(parameters_text, body.image)
        return {"info": text, "items": items, "parameters": parse_parameters(text) if text else {}}

    @app.get(f"{API}/scripts", response_model=ScriptsList)
    async def scripts():
        return {"txt2img": [], "img2img": []}

    @app.get("/health")
    async def health():
        return {"status": "ok", "version": __version__, "models": [b.title for b in service.catalog.bundles]}


def _error(status: int, e: Exception, detail: str, headers: dict | None = None) -> JSONResponse:
    """A1111's error body (modules/api/api.py handle_exception), never a traceback."""
    body = {"error": type(e).__name__, "detail": detail, "body": "", "errors": detail}
    return JSONResponse(status_code=status, content=body, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def bad_request(request: Request, e: RequestError):
        return _error(422, e, str(e))

    @app.exception_handler(QueueFull)
    async def busy(request: Request, e: QueueFull):
        return _error(503, e, str(e), {"Retry-After": str(e.retry_after)})

    @app.exception_handler(Abandoned)
    async def gone(request: Request, e: Abandoned):
        return _error(CLIENT_GONE, e, str(e))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return _error(e.status_code, e, str(e.detail), e.headers)

    @app.exception_handler(SdrtError)
    async def sdrt_error(request: Request, e: SdrtError):
        log.error("%s %s: %s", request.method, request.url.path, e)
        return _error(500, e, str(e))

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return _error(500, e, "internal error (the server log has the details)")
