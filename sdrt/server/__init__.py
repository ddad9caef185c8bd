"""`sdrt serve`: AUTOMATIC1111's HTTP API (/sdapi/v1/...) on sdrt bundles, in one process or on Ray Serve.

Needs the `serve` extra (FastAPI, uvicorn); `sdrt[ray]` adds Ray Serve. The runtime never imports this package.
"""
