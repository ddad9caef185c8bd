"""`sdrt serve`: AUTOMATIC1111's HTTP API on one or more bundles, on this machine or on a Ray cluster."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import signal
import time
from pathlib import Path

from sdrt.cli.generate import add_engine_options, engine_options

EXAMPLES = """examples:
  sdrt serve                                        # the shipped model on http://127.0.0.1:7861/sdapi/v1/...
  sdrt serve -b sd15 -b sd15-inpainting --api-auth alice:secret --listen   # all interfaces, Basic auth
  sdrt serve -b sd15 --ray --replicas 4             # a local Ray instance, 4 replicas of one pipeline each
  sdrt serve -b sd15 --ray --address auto --min-replicas 1 --max-replicas 8   # a running cluster, autoscaling
"""
log = logging.getLogger(__name__)


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("serve", parents=[common], help="serve AUTOMATIC1111's HTTP API (needs sdrt[serve])",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-b", "--bundle", type=Path, action="append", help="a bundle to serve (repeat for several; "
                   "clients choose with sd_model_checkpoint; default: the model shipped with sdrt)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--listen", action="store_true", help="listen on all interfaces (0.0.0.0), or allow a --host "
                   "that is not loopback: other machines can reach the server")
    p.add_argument("--port", type=int, default=7861, help="default 7861 (A1111's API-only port)")
    p.add_argument("--api-auth", metavar="USER:PASS[,USER:PASS]", help="HTTP Basic auth on every route")
    _add_limit_options(p)
    add_engine_options(p)
    _add_ray_options(p)
    p.set_defaults(run=_serve)


def _add_limit_options(p) -> None:
    from sdrt.server.jobs import Limits

    d = Limits()
    g = p.add_argument_group("limits (a request beyond one is refused with 422 before any work)")
    g.add_argument("--queue-size", type=int, default=d.queue_size, help="requests waiting per pipeline beside the "
                   f"running one; more get 503 with Retry-After (default {d.queue_size})")
    g.add_argument("--max-pixels", type=int, default=d.max_pixels, help=f"width x height (default {d.max_pixels})")
    g.add_argument("--max-steps", type=int, default=d.max_steps, help=f"default {d.max_steps}")
    g.add_argument("--max-images", type=int, default=d.max_images, help=f"batch_size x n_iter (default {d.max_images})")
    g.add_argument("--max-prompt-chars", type=int, default=d.max_prompt_chars, help=f"default {d.max_prompt_chars}")
    g.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20,
                   help=f"request body, init images included (default {d.max_body_bytes // 2**20})")


def _add_ray_options(p) -> None:
    g = p.add_argument_group("Ray Serve (needs sdrt[ray])")
    g.add_argument("--ray", action="store_true", help="run the pipelines as Ray Serve replicas behind Ray's HTTP "
                   "proxy (one pipeline per replica, one request at a time each)")
    g.add_argument("--address", help="Ray cluster to join (auto: the one `ray start` began here; default: start "
                   "a local Ray)")
    g.add_argument("--replicas", type=int, default=1, help="replicas per bundle (default 1; ignored with "
                   "--max-replicas)")
    g.add_argument("--min-replicas", type=int, default=1, help="autoscaling: fewest replicas per bundle")
    g.add_argument("--max-replicas", type=int, help="autoscaling: most replicas per bundle (turns autoscaling on)")
    g.add_argument("--target-ongoing-requests", type=float, default=1.0, help="autoscaling: requests per replica "
                   "it aims for (default 1)")
    g.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves for each replica (default 1)")


def listen_address(args) -> str:
    """--host, refused when it is not loopback and --listen was not given (A1111's --listen)."""
    from sdrt.errors import SdrtError

    if args.listen and args.host == "127.0.0.1":
        return "0.0.0.0"
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        raise SdrtError(f"--host: expected an IP address or localhost, got {args.host!r}") from None
    if not loopback and not args.listen:
        raise SdrtError(f"--host {args.host} lets other machines reach the server: add --listen to mean it")
    return args.host


def limits(args):
    from sdrt.server.jobs import Limits

    return Limits(max_pixels=args.max_pixels, max_steps=args.max_steps, max_images=args.max_images,
                  max_prompt_chars=args.max_prompt_chars, max_body_bytes=int(args.max_body_mb * 2**20),
                  queue_size=args.queue_size)


def _serve(args) -> int:
    try:
        import uvicorn  # noqa: F401

        from sdrt.server.app import create_app
    except ImportError as e:
        from sdrt.errors import BackendError

        raise BackendError(f"sdrt serve needs the serve extra: pip install 'sdrt[serve]' ({e})") from None
    from sdrt.server.auth import parse_credentials
    from sdrt.server.catalog import Catalog

    host = listen_address(args)
    credentials = parse_credentials(args.api_auth) if args.api_auth else None
    if host != "127.0.0.1" and not credentials:
        log.warning("listening on %s without --api-auth: anyone who can reach it can use it", host)
    catalog = Catalog.from_paths(args.bundle)
    if args.ray:
        return _serve_on_ray(args, catalog, credentials, host)
    from sdrt.server.local import LocalService

    service = LocalService(catalog, args.queue_size, args.backend, **engine_options(args))
    try:
        _run_uvicorn(create_app(service, limits(args), credentials), host, args.port, getattr(args, "verbose", False))
    finally:
        service.close()
    return 0


def _serve_on_ray(args, catalog, credentials, host: str) -> int:
    try:
        from sdrt.server import ray_serve
    except ImportError as e:
        from sdrt.errors import BackendError

        raise BackendError(f"sdrt serve --ray needs the ray extra: pip install 'sdrt[ray]' ({e})") from None

    try:
        ray_serve.connect(args.address)
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # after Ray's own: `kill` acts as Ctrl+C
        ray_serve.deploy(catalog, args.backend, engine_options(args), limits(args), credentials, host, args.port,
                         ray_serve.Scaling.from_args(args))
        print(f"sdrt: serving AUTOMATIC1111's API through Ray Serve on http://{host}:{args.port}/sdapi/v1/ "
              "(Ctrl+C to stop)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        ray_serve.stop()


def _run_uvicorn(app, host: str, port: int, verbose: bool) -> None:
    import uvicorn

    print(f"sdrt: serving AUTOMATIC1111's API on http://{host}:{port}/sdapi/v1/ (Ctrl+C to stop)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info" if verbose else "warning", timeout_graceful_shutdown=5)
