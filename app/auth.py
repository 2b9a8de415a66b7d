"""Who a request comes from, and whether it may do what it asks: API keys, admin keys, cross-site refusals.

`Guard` runs before any route. With `CHARRNN_API_KEYS` set, every path but the open ones (health, readiness,
the page) needs `Authorization: Bearer <key>`; `/admin/*` needs an admin key, or without admin keys a
loopback client. It names the client (`Client`) for the routes, the per-client limits and the access log:
its key's fingerprint, or its address when the server has no keys. Keys are compared in constant time and
never stored or logged as they are, only as a fingerprint (a hash prefix).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import send_error

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/", "/favicon.ico"})
# The API's description is public, like the page: it holds no data, and Swagger UI fetches it without a key.
DOC_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MIN_KEY_CHARS = 16


def is_open(path: str) -> bool:
    """Paths anyone may reach: health, readiness, the page and its files, the API description."""
    return path in OPEN_PATHS or path in DOC_PATHS or path.startswith("/static/")


@dataclass(frozen=True, slots=True)
class Client:
    """The caller of a request. `id` keys per-client limits and the access log; `owner` is the fingerprint
    of its key (sessions belong to it), None on a server without keys."""

    id: str
    owner: str | None = None
    admin: bool = False


def fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class KeyRing:
    """A set of keys, looked up in constant time: every key is compared, whatever matched first."""

    def __init__(self, keys: list[str]):
        self._digests = [(hashlib.sha256(k.encode()).digest(), fingerprint(k)) for k in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def match(self, token: str) -> str | None:
        """The matching key's fingerprint, or None."""
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for known, name in self._digests:
            if hmac.compare_digest(digest, known):  # equal-length digests: no length or prefix leaks
                found = name
        return found


def load_keys(value: SecretStr, file: Path | None, setting: str) -> list[str]:
    """Keys from a comma-separated setting and a file (one per line, `#` comments). Short keys are refused."""
    keys = [k.strip() for k in value.get_secret_value().split(",")]
    if file is not None:
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise ValueError(f"{setting}_FILE: cannot read {file.name}: {e.strerror}") from None
        keys += [line.strip() for line in lines if not line.lstrip().startswith("#")]
    keys = [k for k in keys if k]
    if any(len(k) < MIN_KEY_CHARS for k in keys):
        raise ValueError(f"{setting}: every key needs at least {MIN_KEY_CHARS} characters")
    if any(not k.isascii() or not k.isprintable() or " " in k for k in keys):
        raise ValueError(f"{setting}: keys are printable ASCII without spaces or commas")
    return keys


def bearer_token(headers: dict[bytes, bytes]) -> str | None:
    value = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, token = value.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cross_site(headers: dict[bytes, bytes], allowed_origins: frozenset[str]) -> bool:
    """A browser request sent by a page of another site. Browsers send `Origin` on every POST and DELETE,
    with or without a CORS preflight, and `Sec-Fetch-Site` where they support it."""
    origin = headers.get(b"origin", b"").decode("latin-1")
    if not origin or origin in allowed_origins:
        return False
    site = headers.get(b"sec-fetch-site", b"").decode("latin-1")
    if site:
        return site not in ("same-origin", "none")
    return urlsplit(origin).netloc != headers.get(b"host", b"").decode("latin-1")


class Guard:
    """ASGI middleware: refuse cross-site writes, authenticate, authorise admin routes, apply the per-client
    request rate, and put the `Client` in `scope["state"]["client"]`."""

    def __init__(self, app: ASGIApp, api_keys: KeyRing, admin_keys: KeyRing, cors_origins: frozenset[str],
                 quotas):
        self.app, self.api_keys, self.admin_keys = app, api_keys, admin_keys
        self.cors_origins, self.quotas = cors_origins, quotas

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        path: str = scope["path"]
        address = (scope.get("client") or ("unknown", 0))[0]
        state = scope.setdefault("state", {})
        state["client"] = client = Client(f"address:{address}")
        if scope["method"] in UNSAFE_METHODS and cross_site(headers, self.cors_origins):
            return await self._refuse(scope, send, 403, "cross_origin_forbidden",
                                      "requests from pages of other sites are refused; list the site's origin "
                                      "in CHARRNN_CORS_ORIGINS to allow it")
        if is_open(path):
            return await self.app(scope, receive, send)
        token = bearer_token(headers) if self.api_keys or self.admin_keys else None
        if token is not None:
            admin = self.admin_keys.match(token)
            owner = admin or self.api_keys.match(token)
            if owner is None:
                return await self._unauthenticated(scope, send, "the API key is not valid")
            client = Client(f"key:{owner}", owner=owner, admin=admin is not None)
        elif self.api_keys:
            return await self._unauthenticated(scope, send, "no API key given")
        if path.startswith("/admin/"):
            if self.admin_keys and not client.admin:
                if client.owner is None:
                    return await self._unauthenticated(scope, send, "no admin key given")
                return await self._refuse(scope, send, 403, "permission_error",
                                          "this route needs an admin key (CHARRNN_ADMIN_KEYS)")
            # Through a proxy the address is the one it forwarded, and a proxy on this host would make every
            # client look local: without admin keys, admin requests must come straight from loopback.
            forwarded = b"x-forwarded-for" in headers or b"forwarded" in headers
            if not self.admin_keys and (forwarded or not is_loopback(address)):
                return await self._refuse(scope, send, 403, "permission_error",
                                          "admin routes answer only on loopback unless admin keys are set "
                                          "(CHARRNN_ADMIN_KEYS)")
        retry = await self.quotas.hit_request(client)
        if retry is not None:
            return await self._refuse(scope, send, 429, "rate_limited",
                                      f"too many requests from this client (CHARRNN_CLIENT_RATE="
                                      f"{self.quotas.settings.client_rate}); retry in {retry} s",
                                      {"retry-after": str(retry)})
        state["client"] = client
        await self.app(scope, receive, send)

    async def _unauthenticated(self, scope: Scope, send: Send, why: str) -> None:
        await self._refuse(scope, send, 401, "authentication_error",
                           f"{why}: send the header 'Authorization: Bearer <key>'", {"www-authenticate": "Bearer"})

    async def _refuse(self, scope: Scope, send: Send, status: int, type: str, message: str,
                      headers: dict[str, str] | None = None) -> None:
        self.quotas.metrics.rejected.labels(reason=type).inc()
        await send_error(scope, send, status, type, message, headers)

