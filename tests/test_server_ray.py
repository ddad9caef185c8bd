"""`sdrt serve --ray`: the same A1111 app on Ray Serve, checked through Ray's own HTTP proxy on a local Ray
(2 CPUs): two bundles of two replicas each (one pipeline per replica, one request at a time), 16 concurrent
clients against a queue of 4 per bundle (every response its own image, pixel for pixel, or a 503), the model
choice routed to that bundle's replicas, and /progress and /interrupt reaching a replica through Ray.
"""
from __future__ import annotations

import json
import shutil
import socket
import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from serving import all_at_once, decode  # noqa: E402

from sdrt.runtime.driver import run  # noqa: E402
from sdrt.runtime.pipeline import Pipeline, default_bundle  # noqa: E402
from sdrt.runtime.request import GenerationRequest  # noqa: E402
from sdrt.server.catalog import Catalog  # noqa: E402
from sdrt.server.jobs import Limits  # noqa: E402

pytestmark = pytest.mark.ray

PROMPT = "a red circle on a blue background"
FAST = {"steps": 4, "sampler_name": "Euler", "width": 64, "height": 64, "cfg_scale": 7}
QUEUE, REPLICAS, CLIENTS = 4, 2, 16
TIMEOUT = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    from ray import serve

    from sdrt.server.ray_serve import APP_NAME, Scaling, application

    copy = tmp_path_factory.mktemp("bundles") / "shapes-copy"
    shutil.copytree(default_bundle(), copy)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = application(Catalog.from_paths([default_bundle(), copy]), "onnxruntime", {"threads": 1},
                          Limits(queue_size=QUEUE), None, Scaling(replicas=REPLICAS, replica_cpus=0.5))
        serve.run(app, name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def txt2img(url: str, **fields) -> httpx.Response:
    return httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": PROMPT, **FAST, **fields}, timeout=TIMEOUT)


def test_sixteen_clients_through_rays_proxy(url):
    def client(seed: int):
        model = "shapes-copy" if seed % 2 else "sdrt-shapes"
        return model, txt2img(url, seed=seed, override_settings={"sd_model_checkpoint": model})

    seeds = list(range(200, 200 + CLIENTS))
    results = dict(zip(seeds, all_at_once(client, seeds, TIMEOUT)))
    done = {seed: r for seed, r in results.items() if r[1].status_code == 200}
    busy = [r for _, r in results.values() if r.status_code == 503]
    assert len(done) + len(busy) == CLIENTS and len(done) >= REPLICAS + QUEUE
    assert all(int(r.headers["Retry-After"]) >= 1 for r in busy)
    with Pipeline.load(default_bundle(), backend="onnxruntime") as pipe:
        for seed, (model, response) in done.items():
            info = json.loads(response.json()["info"])
            assert info["all_seeds"] == [seed] and info["sd_model_name"] == model  # routed to that bundle
            reference = next(run(pipe, GenerationRequest(PROMPT, seed=seed, steps=4, sampler="Euler", width=64,
                                                         height=64, guidance_scale=7))).image
            assert np.array_equal(np.asarray(decode(response.json()["images"][0])), np.asarray(reference))


def test_progress_and_interrupt_reach_the_replica(url):
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=txt2img(url, seed=1, steps=150)))
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while httpx.get(f"{url}/sdapi/v1/progress").json()["state"]["sampling_step"] < 2:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.05)
    interrupted_at = time.monotonic()
    httpx.post(f"{url}/sdapi/v1/interrupt")
    thread.join(TIMEOUT)
    assert result["r"].status_code == 200 and len(result["r"].json()["images"]) == 1
    assert time.monotonic() - interrupted_at < 5
