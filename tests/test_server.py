"""`sdrt serve` against its references: AUTOMATIC1111's API as the `webuiapi` client speaks it, `sdrt generate` for
the images (pixel-identical, same parameters text), and the load rules (one job per pipeline, a bounded queue,
limits, interrupt, skip, disconnects, auth). Every test talks HTTP to a real server on a free loopback port.

Tolerances: images from the API and from the CLI are compared exactly (0 of 255 per pixel): the same driver runs
on the same backend with the same seeds. Timings are bounds an order of magnitude above what they measure (a
100-step job takes ~5 s here; an interrupted one must answer well before it would have finished).
"""
from __future__ import annotations

import base64
import json
import shutil
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from serving import all_at_once, b64_png, decode, running  # noqa: E402

from sdrt.runtime.driver import run  # noqa: E402
from sdrt.runtime.outputs import read_parameters  # noqa: E402
from sdrt.runtime.pipeline import default_bundle  # noqa: E402
from sdrt.runtime.request import GenerationRequest  # noqa: E402
from sdrt.server.app import create_app  # noqa: E402
from sdrt.server.catalog import Catalog  # noqa: E402
from sdrt.server.jobs import Limits  # noqa: E402
from sdrt.server.local import LocalService  # noqa: E402

PROMPT = "a red circle on a blue background"
FAST = {"steps": 4, "sampler_name": "Euler", "width": 64, "height": 64, "cfg_scale": 7}
LONG_STEPS = 100  # ~5 s on the shipped model here: long enough to act on mid-run
LIMITS = Limits(max_pixels=128 * 128, max_steps=LONG_STEPS, max_images=4, max_prompt_chars=500,
                max_body_bytes=2**20, queue_size=4)
TIMEOUT = 60


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """The shipped model served twice, under two folder names: two pipelines, two lanes."""
    copy = tmp_path_factory.mktemp("bundles") / "shapes-copy"
    shutil.copytree(default_bundle(), copy)
    service = LocalService(Catalog.from_paths([default_bundle(), copy]), LIMITS.queue_size, backend="onnxruntime")
    yield service
    service.close()


@pytest.fixture(scope="module")
def url(service):
    with running(create_app(service, LIMITS)) as base:
        yield base


def txt2img(url: str, **fields) -> httpx.Response:
    return httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": PROMPT, **FAST, **fields}, timeout=TIMEOUT)


def progress(url: str, **params) -> dict:
    return httpx.get(f"{url}/sdapi/v1/progress", params=params, timeout=TIMEOUT).json()


def wait_for_step(url: str, step: int) -> dict:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        state = progress(url)
        if state["state"]["sampling_step"] >= step:
            return state
        time.sleep(0.02)
    raise AssertionError(f"the job never reached step {step}")


def in_background(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    result = {}

    def target():
        started = time.monotonic()
        result["response"] = fn(*args, **kwargs)
        result["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=target)
    thread.start()
    return thread, result


def test_webuiapi_calls_work_unchanged(url, service):
    webuiapi = pytest.importorskip("webuiapi")
    host, port = url.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=4)
    first = api.txt2img(prompt=PROMPT, seed=5, width=64, height=64, cfg_scale=7.5)
    assert first.image.size == (64, 64) and first.info["all_seeds"] == [5]
    assert "Seed: 5," in first.image.info["parameters"] and first.parameters["prompt"] == PROMPT
    second = api.img2img(images=[first.image], prompt=PROMPT, seed=6, width=64, height=64, denoising_strength=0.6)
    assert second.image.size == (64, 64) and "Denoising strength: 0.6" in second.info["infotexts"][0]
    assert api.get_options()["sd_model_checkpoint"] == service.catalog.bundles[0].title
    api.set_options({"sd_model_checkpoint": "shapes-copy"})
    try:
        assert api.util_get_current_model() == service.catalog.bundles[1].title
        assert api.txt2img(prompt=PROMPT, seed=5, width=64, height=64).info["sd_model_name"] == "shapes-copy"
    finally:
        api.set_options({"sd_model_checkpoint": service.catalog.bundles[0].title})
    assert api.png_info(first.image).parameters["Seed"] == "5"
    assert "Euler a" in api.util_get_sampler_names() and "karras" in api.util_get_scheduler_names()


@pytest.mark.parametrize("case", ["txt2img", "inpaint"])
def test_an_api_image_equals_sdrt_generate(url, tmp_path, case):
    from sdrt.cli import main

    fields = {"prompt": PROMPT, "steps": 6, "seed": 11, "sampler_name": "Euler", "width": 64, "height": 64,
              "cfg_scale": 7, "negative_prompt": "green"}
    argv = ["generate", PROMPT, "-n", "green", "--steps", "6", "--seed", "11", "--sampler", "Euler", "-W", "64",
            "-H", "64", "--cfg-scale", "7", "-q", "-o", str(tmp_path / "cli.png")]
    endpoint = "txt2img"
    if case == "inpaint":
        init, mask = Image.new("RGB", (64, 64), "navy"), Image.new("L", (64, 64), 0)
        ImageDraw.Draw(init).ellipse((8, 8, 40, 40), fill="red")
        ImageDraw.Draw(mask).rectangle((24, 24, 56, 56), fill=255)
        init.save(tmp_path / "init.png")
        mask.save(tmp_path / "mask.png")
        endpoint = "img2img"
        fields.update(init_images=[b64_png(init)], mask=b64_png(mask), denoising_strength=0.7, mask_blur=2,
                      inpainting_fill=1, inpaint_full_res=False)
        argv += ["--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"), "--strength",
                 "0.7", "--mask-blur", "2"]
    response = httpx.post(f"{url}/sdapi/v1/{endpoint}", json=fields, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    assert main(argv) == 0
    api, cli = decode(response.json()["images"][0]), Image.open(tmp_path / "cli.png")
    assert np.array_equal(np.asarray(api), np.asarray(cli))
    assert api.info["parameters"] == read_parameters(tmp_path / "cli.png")
    assert json.loads(response.json()["info"])["infotexts"] == [api.info["parameters"]]


def test_sixteen_clients_a_queue_of_four_none_lost_or_swapped(url, service):
    seeds = list(range(100, 116))
    results = dict(zip(seeds, all_at_once(lambda seed: txt2img(url, seed=seed, prompt=f"{PROMPT} {seed}"), seeds,
                                          TIMEOUT)))
    done = {seed: r for seed, r in results.items() if r.status_code == 200}
    busy = [r for r in results.values() if r.status_code == 503]
    assert len(done) >= 1 + LIMITS.queue_size and busy and len(done) + len(busy) == len(seeds)
    assert all(int(r.headers["Retry-After"]) >= 1 and r.json()["error"] == "QueueFull" for r in busy)
    pipe = service.lanes[service.catalog.bundles[0].title].pipe
    for seed, response in done.items():
        body = json.loads(response.json()["info"])
        assert body["all_seeds"] == [seed] and body["prompt"] == f"{PROMPT} {seed}"
        image = decode(response.json()["images"][0])
        assert f"Seed: {seed}," in image.info["parameters"]
        request = GenerationRequest(f"{PROMPT} {seed}", seed=seed, steps=4, sampler="Euler", width=64, height=64,
                                    guidance_scale=7)
        reference = next(run(pipe, request)).image
        assert np.array_equal(np.asarray(image), np.asarray(reference)), f"seed {seed}: not its own image"


def test_two_bundles_run_side_by_side(url):
    """One generation at a time per pipeline, not per server: a job on the second bundle does not wait."""
    thread, long = in_background(txt2img, url, steps=LONG_STEPS, seed=1)
    wait_for_step(url, 1)
    started = time.monotonic()
    other = txt2img(url, seed=2, override_settings={"sd_model_checkpoint": "shapes-copy"})
    assert other.status_code == 200 and json.loads(other.json()["info"])["sd_model_name"] == "shapes-copy"
    assert time.monotonic() - started < 3 and thread.is_alive()
    httpx.post(f"{url}/sdapi/v1/interrupt", timeout=TIMEOUT)
    thread.join(TIMEOUT)


def test_progress_and_interrupt(url):
    thread, result = in_background(txt2img, url, steps=LONG_STEPS, seed=3,
                                   override_settings={"show_progress_every_n_steps": 1})
    state = wait_for_step(url, 2)
    assert 0 < state["progress"] < 1 and state["state"]["job_count"] == 1
    assert state["state"]["sampling_steps"] == LONG_STEPS and state["eta_relative"] > 0
    deadline = time.monotonic() + TIMEOUT
    while (preview := progress(url)["current_image"]) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert decode(preview).size == (64, 64)  # the shipped model's VAE previews at full size
    interrupted_at = time.monotonic()
    assert httpx.post(f"{url}/sdapi/v1/interrupt", timeout=TIMEOUT).json() == {}
    thread.join(TIMEOUT)
    response = result["response"]
    assert response.status_code == 200 and len(response.json()["images"]) == 1
    assert time.monotonic() - interrupted_at < 2  # stopped at the next step, the partial result decoded
    assert progress(url)["state"]["job_count"] == 0 and progress(url)["progress"] == 0


def test_skip_moves_on_to_the_next_image(url, service):
    # LONG_STEPS, not fewer: on a loaded machine a short first image can finish before the skip arrives
    thread, result = in_background(txt2img, url, steps=LONG_STEPS, seed=7, n_iter=2)
    wait_for_step(url, 2)
    assert httpx.post(f"{url}/sdapi/v1/skip", timeout=TIMEOUT).status_code == 200
    thread.join(TIMEOUT)
    body = result["response"].json()
    assert json.loads(body["info"])["all_seeds"] == [7, 8] and len(body["images"]) == 2
    pipe = service.lanes[service.catalog.bundles[0].title].pipe
    full = next(run(pipe, GenerationRequest(PROMPT, seed=7, steps=LONG_STEPS, sampler="Euler", width=64, height=64,
                                            guidance_scale=7))).image
    assert not np.array_equal(np.asarray(decode(body["images"][0])), np.asarray(full))  # cut short, then decoded


def test_a_client_that_leaves_frees_the_worker(url):
    def leave_early():
        try:
            httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": PROMPT, **FAST, "steps": LONG_STEPS}, timeout=1.0)
        except httpx.TimeoutException:
            pass  # gives up after a second and closes the connection

    thread, _ = in_background(leave_early)
    wait_for_step(url, 1)
    thread.join(TIMEOUT)  # the client has closed its connection
    started = time.monotonic()
    assert txt2img(url, seed=10).status_code == 200
    assert time.monotonic() - started < 3  # the abandoned 100-step job no longer holds the pipeline
    assert progress(url)["state"]["job_count"] == 0


def test_png_info_reads_back_the_parameters(url):
    image = txt2img(url, seed=12, negative_prompt="green, dull").json()["images"][0]
    out = httpx.post(f"{url}/sdapi/v1/png-info", json={"image": image}, timeout=TIMEOUT).json()
    assert out["info"].startswith(PROMPT) and out["parameters"]["Seed"] == "12"
    assert out["parameters"]["Negative prompt"] == "green, dull"
    assert (out["parameters"]["Size-1"], out["parameters"]["Size-2"]) == ("64", "64")


def test_gpu_seeds_through_override_settings(url):
    cpu = txt2img(url, seed=13).json()
    gpu = txt2img(url, seed=13, override_settings={"randn_source": "GPU"}).json()
    assert "RNG: CPU" in json.loads(cpu["info"])["infotexts"][0]
    assert "RNG" not in json.loads(gpu["info"])["infotexts"][0]  # A1111 writes RNG only when not its GPU default
    assert not np.array_equal(np.asarray(decode(cpu["images"][0])), np.asarray(decode(gpu["images"][0])))


def bomb() -> str:
    """A 1x1 PNG whose header claims 20000x20000 pixels: refused from the header, never decoded."""
    png = bytearray(base64.b64decode(b64_png(Image.new("L", (1, 1)))))
    png[16:24] = struct.pack(">II", 20000, 20000)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return base64.b64encode(bytes(png)).decode()



@pytest.mark.parametrize("endpoint, fields, names", [
    ("txt2img", {"steps": "many"}, "steps"),
    ("txt2img", {"width": 60}, "width"),
    ("txt2img", {"width": 256, "height": 256}, "width x height"),
    ("txt2img", {"steps": LONG_STEPS + 1}, "steps"),
    ("txt2img", {"batch_size": 2, "n_iter": 3}, "batch_size x n_iter"),
    ("txt2img", {"prompt": "x" * 501}, "prompt"),
    ("txt2img", {"enable_hr": True}, "enable_hr"),
    ("txt2img", {"subseed_strength": 0.5}, "subseed_strength"),
    ("txt2img", {"alwayson_scripts": {"ControlNet": {"args": []}}}, "alwayson_scripts"),
    ("txt2img", {"sampler_name": "Euler b"}, "sampler"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "sd_xl_base"}}, "sd_model_checkpoint"),
    ("txt2img", {"override_settings": {"CLIP_stop_at_last_layers": 2}}, "CLIP_stop_at_last_layers"),
    ("img2img", {}, "init_images"),
    ("img2img", {"init_images": ["not base64!"]}, "init_images[0]"),
    ("img2img", {"init_images": ["aGVsbG8="]}, "init_images[0]"),  # "hello": base64, not an image
    ("img2img", {"init_images": [b64_png(Image.new("RGB", (64, 64)))[:80]]}, "init_images[0]"),  # truncated
    ("img2img", {"init_images": [bomb()]}, "init_images[0]"),
    ("img2img", {"init_images": [b64_png(Image.new("RGB", (64, 64)))], "mask": b64_png(Image.new("L", (64, 64))),
                 "inpainting_fill": 0}, "inpainting_fill"),
])
def test_bad_requests_are_4xx_with_a_message(url, endpoint, fields, names):
    response = httpx.post(f"{url}/sdapi/v1/{endpoint}", json={"prompt": PROMPT, **FAST, **fields}, timeout=TIMEOUT)
    assert response.status_code == 422, response.text
    assert names in response.text and "Traceback" not in response.text


def test_bad_bodies_are_4xx(url):
    post = f"{url}/sdapi/v1/txt2img"
    bad_json = httpx.post(post, content=b"{prompt:", headers={"content-type": "application/json"})
    assert bad_json.status_code == 422 and "JSON" in bad_json.text
    too_big = httpx.post(post, content=b" " * (LIMITS.max_body_bytes + 1), headers={"content-type": "application/json"})
    assert too_big.status_code == 422 and "request body: at most" in too_big.text
    assert httpx.post(f"{url}/sdapi/v1/png-info", json={"image": "@@@"}).status_code == 422
    assert httpx.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}).status_code == 422
    assert httpx.get(f"{url}/sdapi/v1/nothing-here").status_code == 404


def test_basic_auth_on_every_route(service):
    webuiapi = pytest.importorskip("webuiapi")
    with running(create_app(service, LIMITS, {"alice": "s3cret:x", "bob": "pw"})) as base:
        for path in ("/sdapi/v1/sd-models", "/health", "/docs", "/nowhere"):
            refused = httpx.get(base + path)
            assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith("Basic")
        assert httpx.get(base + "/health", auth=("alice", "wrong")).status_code == 401
        assert httpx.get(base + "/health", auth=("carol", "pw")).status_code == 401
        assert httpx.get(base + "/health", auth=("alice", "s3cret:x")).status_code == 200
        assert httpx.post(base + "/sdapi/v1/txt2img", json={"prompt": "x"}).status_code == 401
        host, port = base.removeprefix("http://").split(":")
        api = webuiapi.WebUIApi(host=host, port=int(port), username="bob", password="pw", sampler="Euler", steps=2)
        assert api.txt2img(prompt=PROMPT, seed=1, width=64, height=64).image.size == (64, 64)


def test_listening_beyond_loopback_needs_listen(capsys):
    from sdrt.cli import main

    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "add --listen" in capsys.readouterr().err
    assert main(["serve", "--api-auth", "nopassword"]) == 2
