"""A real HTTP server for tests: uvicorn on a loopback socket bound to a free port, in a background thread."""
from __future__ import annotations

import base64
import io
import socket
import threading
import time
from contextlib import contextmanager

from PIL import Image

START_TIMEOUT_S = 30


@contextmanager
def running(app):
    """Serve `app` on 127.0.0.1 at a free port; yields the base URL. The socket is bound before the server starts,
    so no other process can take the port in between."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=START_TIMEOUT_S)
        sock.close()


def b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def all_at_once(fn, arguments: list, timeout: float) -> list:
    """fn(argument) for each argument, each in its own thread, all released together by a barrier."""
    barrier, results = threading.Barrier(len(arguments)), [None] * len(arguments)

    def client(i: int) -> None:
        barrier.wait()
        results[i] = fn(arguments[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(arguments))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return results
