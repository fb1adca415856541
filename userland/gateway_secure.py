"""The gateway's guards: who may read ``/metrics``, an ``x-request-id`` on every response, and
the rule that bearer tokens never cross a network in clear (TLS, or ``--insecure``).
"""
from __future__ import annotations

import copy
import hashlib
import logging
import re
import secrets
import ssl
import threading
import time

from llmos.syscalls import locate
from llmos.syscalls.errors import SyscallError
from llmos.userland.gateway_request import ApiError, bearer_token

log = logging.getLogger("llmos.gateway")
METRICS_CAPS = ("admin", "metrics")
CACHE_S = 5.0                        # how long a token's capabilities are trusted for /metrics
_SANE_ID = re.compile(r"[\x21-\x7e]{1,128}")


class MetricsGuard:
    """``/metrics`` needs a bearer token of a user with capability admin or metrics (cached
    briefly per token hash, so a scraper costs one ``whoami`` every few seconds)."""

    def __init__(self, pool, public: bool = False):
        self.pool, self.public = pool, public
        self._seen: dict[str, tuple[float, bool]] = {}
        self._lock = threading.Lock()

    def check(self, authorization: str | None) -> None:
        """Raises ApiError 401/403 unless the request may read the metrics (blocking: a thread)."""
        if self.public:
            return
        token = bearer_token(authorization, None)
        key = hashlib.sha256(token.encode()).hexdigest()
        with self._lock:
            when, allowed = self._seen.get(key, (0.0, False))
        if time.monotonic() - when > CACHE_S:
            try:
                allowed = bool(set(self.pool.whoami(token)["caps"]) & set(METRICS_CAPS))
            except SyscallError as err:
                if err.errno == "EACCES":
                    raise ApiError(401, "invalid token", "authentication_error", code="invalid_api_key") from None
                raise
            with self._lock:
                self._seen[key] = (time.monotonic(), allowed)
        if not allowed:
            raise ApiError(403, "/metrics needs a token of a user with capability 'admin' or 'metrics'",
                           "permission_error", code="insufficient_permissions")


class RequestId:
    """ASGI middleware: every response carries ``x-request-id`` — the client's own, if sane
    (1-128 printable characters), else a fresh one; streamed responses too. Handlers find it in
    ``request.state.request_id``; each response is logged with it as it starts (the access log,
    in place of uvicorn's)."""

    def __init__(self, app, access_log: logging.Logger = logging.getLogger("llmos.gateway.access")):
        self.app, self.access_log = app, access_log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"x-request-id"), "")
        rid = given if _SANE_ID.fullmatch(given) else "req_" + secrets.token_hex(12)
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
                client = "%s:%s" % tuple(scope["client"]) if scope.get("client") else "-"
                self.access_log.info('%s - "%s %s HTTP/%s" %d request_id=%s', client, scope["method"],
                                     scope["path"], scope.get("http_version", "1.1"), message["status"], rid)
            await send(message)
        await self.app(scope, receive, send_with_id)


def log_config() -> dict:
    """uvicorn's logging config plus the gateway's loggers: warnings and errors to stderr, and
    ``RequestId``'s access log (with request ids) to stdout, where uvicorn's own would go."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["handlers"]["gateway_access"] = {"formatter": "default", "class": "logging.StreamHandler",
                                            "stream": "ext://sys.stdout"}
    config["loggers"]["llmos.gateway"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    config["loggers"]["llmos.gateway.access"] = {"handlers": ["gateway_access"], "level": "INFO",
                                                 "propagate": False}
    return config


def check_serving(host: str, cert: str | None, key: str | None, insecure: bool) -> str | None:
    """Whether to serve as asked: the error that refuses it, or None (warning when insecure)."""
    if (cert is None) != (key is None):
        return "--tls-cert and --tls-key go together"
    if cert is not None:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            return f"cannot use the TLS certificate {cert} with key {key}: {exc}"
        return None
    if host not in locate.LOOPBACK_HOSTS:
        if not insecure:
            return (f"refusing to serve plain HTTP on {host}: bearer tokens would cross the network in clear; "
                    f"give --tls-cert and --tls-key (or --insecure to do it anyway)")
        log.warning("serving plain HTTP on %s (--insecure): bearer tokens cross the network in clear", host)
        print(f"llmos serve-http: WARNING: plain HTTP on {host} (--insecure): bearer tokens cross the network "
              f"in clear", flush=True)
    return None
