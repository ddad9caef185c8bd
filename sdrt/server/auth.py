"""HTTP Basic auth on every route, as A1111's `--api-auth user:pass[,user2:pass2]` (modules/api/api.py `auth`),
as ASGI middleware so that nothing (docs, unknown paths, the body) is read before the check."""
from __future__ import annotations

import base64
import binascii
import json
from hmac import compare_digest

from sdrt.errors import RequestError


def parse_credentials(text: str) -> dict[str, str]:
    """'user:pass,user2:pass2' -> {user: pass}; a password may contain ':' (split at the first)."""
    credentials = {}
    for pair in text.split(","):
        user, sep, password = pair.partition(":")
        if not sep or not user or not password:
            raise RequestError(f"--api-auth: expected user:password[,user2:password2], got an entry {pair!r}")
        credentials[user] = password
    return credentials


class BasicAuth:
    """401 with `WWW-Authenticate: Basic` for any HTTP request without one of the credentials."""

    def __init__(self, app, credentials: dict[str, str]):
        self.app = app
        self.credentials = [(u.encode(), p.encode()) for u, p in credentials.items()]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self._authorized(dict(scope["headers"]).get(b"authorization", b"")):
            return await self.app(scope, receive, send)
        body = json.dumps({"detail": "Incorrect username or password"}).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b'Basic realm="sdrt"')]})
        await send({"type": "http.response.body", "body": body})

    def _authorized(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            user, sep, password = base64.b64decode(token.strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        # Every pair is compared, in constant time, so the answer's timing says nothing about which part was wrong.
        matches = [compare_digest(user, u) & compare_digest(password, p) for u, p in self.credentials]
        return bool(sep) and any(matches)
