"""An OpenAI-compatible HTTP gateway: a userland program that serves ``/v1/chat/completions``,
``/v1/completions`` and ``/v1/models`` from a kernel through the syscall ABI only.

A bearer token is an llmos user token: requests run as that user, under its quotas. Each
choice of a request is one kernel process, streamed by a worker thread (``read``, then ``wait``
for its usage) into one asyncio queue; the event loop never blocks on the ABI. A client that
goes away mid-stream has its processes killed. See docs/gateway.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llmos.syscalls import locate
from llmos.syscalls.errors import SyscallError
from llmos.userland.gateway_metrics import GatewayMetrics
from llmos.userland.gateway_pool import ClientPool
from llmos.userland.gateway_secure import MetricsGuard, RequestId, check_serving, log_config
from llmos.userland.gateway_request import (TRANSPORT_ERRNOS, ApiError, Job, api_error_of, bearer_token,
                                            parse_job, read_json)

log = logging.getLogger("llmos.gateway")

MODELS_TTL_S = 1.0


class Generation:
    """The kernel processes of one request. Worker threads, started at once (so processes are
    reaped even if the answer is never sent), pump each one into one queue as
    ("delta", index, text) ... ("done", index, wait_result), or ("error", index, exc)."""

    def __init__(self, gw: Gateway, token: str, job: Job, pids: list[int], t0: float):
        self.gw, self.token, self.job, self.pids, self.t0 = gw, token, job, pids, t0
        self.live_pids = set(pids)
        self.results: dict[int, dict] = {}
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        for i, pid in enumerate(pids):
            loop.run_in_executor(gw.pumps, self._pump, i, pid,
                                 lambda item: loop.call_soon_threadsafe(self.queue.put_nowait, item))

    async def events(self):
        while self.live_pids:
            item = await self.queue.get()
            if item[0] == "error":
                raise item[2]
            if item[0] == "done":
                index, result = item[1], item[2]
                self.live_pids.discard(self.pids[index])
                self.results[index] = result
                if result.get("finish_reason") == "error":
                    why = " ".join(e.get("message", "") for e in result.get("events", []) if e.get("event") == "error")
                    raise ApiError(503, f"generation failed: {why}", "server_error", code="generation_failed")
                usage, m = result.get("usage") or {}, self.gw.metrics
                m.tokens_out.labels(self.job.model).inc(usage.get("completion_tokens", 0))
                if index == 0:
                    m.tokens_in.labels(self.job.model).inc(usage.get("prompt_tokens", 0))
            yield item

    def _pump(self, index: int, pid: int, put) -> None:
        prio = str(self.job.priority)
        ttft, itl = self.gw.metrics.ttft.labels(prio), self.gw.metrics.itl.labels(prio)
        try:
            with self.gw.pool.client(self.token) as c:
                last = None
                for frame in c.read(pid):
                    num, now = len(frame.get("token_ids") or []), time.monotonic()
                    if num and last is None:
                        ttft.observe(now - self.t0)
                    elif num:
                        for _ in range(num):     # a frame may carry several tokens: spread the gap
                            itl.observe((now - last) / num)
                    last = now if num else last
                    if frame.get("text"):
                        put(("delta", index, frame["text"]))
                put(("done", index, c.wait(pid)))
        except BaseException as exc:     # noqa: BLE001 - handed to the request, never lost
            put(("error", index, exc))

    def abandon(self) -> None:
        """Kill what still runs (the client went away or the request failed); the pumps reap it."""
        for pid in self.live_pids:
            self.gw.calls.submit(self.gw.kill, self.token, pid)
        self.live_pids.clear()

    def usage(self) -> dict:
        done = [self.results[i].get("usage") or {} for i in sorted(self.results)]
        first = done[0] if done else {}
        prompt, completion = first.get("prompt_tokens", 0), sum(u.get("completion_tokens", 0) for u in done)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": first.get("cached_tokens", 0)}}


class Gateway:
    def __init__(self, socket: str | None = None, default_token: str | None = None,
                 max_body_bytes: int = 1 << 20, max_workers: int = 128, metrics_token: str | None = None):
        socket = socket or locate.default_socket()
        self.pool = ClientPool(socket)
        self.default_token = default_token
        self.metrics_token = metrics_token or default_token or locate.saved_token()
        self.max_body_bytes = max_body_bytes
        # Streams hold a thread each for a whole generation; short calls get their own threads
        # so a kill or a spawn never waits behind them.
        self.pumps = ThreadPoolExecutor(max_workers, thread_name_prefix="llmos-gateway-pump")
        self.calls = ThreadPoolExecutor(16, thread_name_prefix="llmos-gateway-call")
        self.metrics = GatewayMetrics(self.kernel_figures)
        self._models: dict[str, tuple[float, list[dict]]] = {}   # token -> (when, what it may see)

    # -- blocking helpers (worker threads) ---------------------------------------------------
    def kill(self, token: str, pid: int) -> None:
        try:
            with self.pool.client(token) as c:
                c.kill(pid, "KILL")
        except SyscallError:
            pass                  # already ended: the pump reaps it

    def model_list(self, token: str) -> list[dict]:
        with self.pool.client(token) as c:
            models = c.uname()["models"]
        now = time.monotonic()
        self._models = {t: v for t, v in self._models.items() if now - v[0] <= MODELS_TTL_S}
        self._models[token] = (now, models)
        return models

    async def models_now(self, token: str) -> list[dict]:
        """The models this token's user may use (the kernel shows each user their own), asked
        at most every MODELS_TTL_S seconds per token."""
        at, models = self._models.get(token, (0.0, []))
        return models if time.monotonic() - at <= MODELS_TTL_S else await self.run(self.model_list, token)

    def spawn_all(self, token: str, job: Job) -> list[int]:
        pids: list[int] = []
        try:
            with self.pool.client(token) as c:
                seeds = job.seeds()
                if len(seeds) > 1 and (seeds[0] is None or seeds[0] + len(seeds) < 1 << 63):
                    # n choices by fork: one process stopped at its prompt, n-1 copies of it
                    # (child i samples with seed+1+i), then all run, sharing cached prompt blocks.
                    pids.append(c.spawn(**job.spawn_args, seed=seeds[0], stopped=True))
                    pids += c.fork(pids[0], n=len(seeds) - 1, seed=seeds[1])
                    c.kill(pids[0], "CONT")
                else:
                    for seed in seeds:
                        pids.append(c.spawn(**job.spawn_args, seed=seed))
        except BaseException:
            for pid in pids:
                self.pumps.submit(self._kill_and_reap, token, pid)
            raise
        return pids

    def _kill_and_reap(self, token: str, pid: int) -> None:
        self.kill(token, pid)
        try:
            with self.pool.client(token) as c:
                c.wait(pid, timeout=30.0)
        except SyscallError:
            pass

    def kernel_figures(self) -> dict:
        if not self.metrics_token:
            return {}
        replies = {}
        with self.pool.client(self.metrics_token) as c:
            for call in ("stat", "meminfo", "models", "free"):
                try:
                    replies[call] = c.call(call)
                except SyscallError as err:
                    if err.errno in TRANSPORT_ERRNOS:
                        raise
        return replies

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.calls, fn, *args)

    # -- request plumbing ----------------------------------------------------------------------
    async def authorize(self, request) -> str:
        token = bearer_token(request.headers.get("authorization"), self.default_token)
        if token in self.pool.known_tokens:
            return token                   # no thread hop for a token already checked
        try:
            await self.run(self.pool.check, token)
        except SyscallError as err:
            if err.errno == "EACCES":
                raise ApiError(401, "invalid token", "authentication_error", code="invalid_api_key") from None
            raise
        return token

    async def generate(self, request, chat: bool):
        t0 = time.monotonic()
        token = await self.authorize(request)
        job = parse_job(await read_json(request, self.max_body_bytes), chat)
        if job.model not in {m["name"] for m in await self.models_now(token)}:
            raise ApiError(404, f"the model {job.model!r} does not exist", param="model", code="model_not_found")
        gen = Generation(self, token, job, await self.run(self.spawn_all, token, job), t0)
        if job.stream:
            return StreamingResponse(self.stream(gen, t0), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            async for _ in gen.events():
                pass
        finally:
            gen.abandon()
        choices = [job.choice(i, gen.results[i]["text"], gen.results[i]["finish_reason"]) for i in range(job.n)]
        return JSONResponse(job.envelope(choices, usage=gen.usage()))

    async def stream(self, gen: Generation, t0: float):
        job = gen.job
        self.metrics.streams.inc()
        try:
            for i in range(job.n):
                yield _sse(job.envelope([job.delta(i, "", None, first=True)], stream=True))
            async for ev in gen.events():
                if ev[0] == "delta":
                    yield _sse(job.envelope([job.delta(ev[1], ev[2], None)], stream=True))
                else:
                    yield _sse(job.envelope([job.delta(ev[1], "", ev[2]["finish_reason"])], stream=True))
            if job.include_usage:
                yield _sse(job.envelope([], stream=True, usage=gen.usage()))
        except ApiError as err:
            yield _sse(err.body())
        except SyscallError as err:
            yield _sse(api_error_of(err).body())
        finally:
            gen.abandon()
            self.metrics.streams.dec()
            self.metrics.request_seconds.labels(job.endpoint).observe(time.monotonic() - t0)
        yield "data: [DONE]\n\n"


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


# -- the application -----------------------------------------------------------------------------
def make_app(socket: str | None = None, default_token: str | None = None, max_body_bytes: int = 1 << 20,
             max_workers: int = 128, metrics_token: str | None = None, public_metrics: bool = False) -> Starlette:
    """The gateway as an ASGI app. ``default_token`` serves requests without an Authorization
    header (else they are refused); kernel metrics are read with ``metrics_token``, else
    ``default_token``, else the local user's saved token. ``/metrics`` answers a bearer token
    of a user with capability admin or metrics (any request with ``public_metrics``)."""
    gw = Gateway(socket, default_token, max_body_bytes, max_workers, metrics_token)
    guard = MetricsGuard(gw.pool, public_metrics)

    def endpoint(name: str, fn):
        async def handle(request):
            t0 = time.monotonic()
            gw.metrics.in_flight.inc()
            try:
                response = await fn(request)
            except ApiError as err:
                response = _error(err)
            except SyscallError as err:
                response = _error(api_error_of(err))
            except Exception:      # a gateway bug: logged here, never a traceback to the client
                log.exception("error serving %s (request_id=%s)", name, request.state.request_id)
                response = _error(ApiError(500, "internal gateway error", "server_error"))
            finally:
                gw.metrics.in_flight.dec()
            gw.metrics.requests.labels(name, str(response.status_code)).inc()
            if not isinstance(response, StreamingResponse):
                gw.metrics.request_seconds.labels(name).observe(time.monotonic() - t0)
            return response
        return handle

    async def chat(request):
        return await gw.generate(request, chat=True)

    async def completions(request):
        return await gw.generate(request, chat=False)

    async def models(request):
        token = await gw.authorize(request)
        rows = await gw.models_now(token)
        data = [{"id": m["name"], "object": "model", "created": 0, "owned_by": "llmos"} for m in rows]
        wanted = request.path_params.get("model")
        if wanted is None:
            return JSONResponse({"object": "list", "data": data})
        for row in data:
            if row["id"] == wanted:
                return JSONResponse(row)
        raise ApiError(404, f"the model {wanted!r} does not exist", param="model", code="model_not_found")

    async def metrics(request):
        await gw.run(guard.check, request.headers.get("authorization"))
        body = await gw.run(generate_latest, gw.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def health(request):
        figures = await gw.run(_kernel_alive, gw)
        return JSONResponse({"status": "ok" if figures else "kernel unavailable"}, status_code=200 if figures else 503)

    async def http_error(request, exc: HTTPException):
        return _error(ApiError(exc.status_code, exc.detail or "error", code="not_found" if exc.status_code == 404 else None))

    routes = [Route("/v1/chat/completions", endpoint("/v1/chat/completions", chat), methods=["POST"]),
              Route("/v1/completions", endpoint("/v1/completions", completions), methods=["POST"]),
              Route("/v1/models", endpoint("/v1/models", models), methods=["GET"]),
              Route("/v1/models/{model:path}", endpoint("/v1/models", models), methods=["GET"]),
              Route("/metrics", endpoint("/metrics", metrics), methods=["GET"]),
              Route("/health", endpoint("/health", health), methods=["GET"])]

    @asynccontextmanager
    async def lifespan(app):
        yield
        for executor in (gw.calls, gw.pumps):
            executor.shutdown(wait=False, cancel_futures=True)
        gw.pool.close()

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan,
                    middleware=[Middleware(RequestId)])
    app.state.gateway = gw
    return app


def _error(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def _kernel_alive(gw: Gateway) -> bool:
    if not gw.metrics_token:
        return True        # nothing to ask the kernel with; the gateway itself is up
    try:
        with gw.pool.client(gw.metrics_token) as c:
            c.nop()
        return True
    except SyscallError:
        return False


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    ap = argparse.ArgumentParser(prog="llmos serve-http", description="OpenAI-compatible HTTP gateway to a kernel")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--socket", default=None, help="kernel endpoint (default: $LLMOS_SOCKET, else the local kernel)")
    ap.add_argument("--token", default=None, help="llmos token for requests without an Authorization header")
    ap.add_argument("--metrics-token", default=None, help="token for kernel figures on /metrics (default: --token, "
                                                          "else the saved local token)")
    ap.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes (413 above)")
    ap.add_argument("--workers", type=int, default=128, help="threads making ABI calls (each stream holds one)")
    ap.add_argument("--tls-cert", default=None, help="serve HTTPS with this certificate (PEM; with --tls-key)")
    ap.add_argument("--tls-key", default=None, help="the certificate's private key (PEM)")
    ap.add_argument("--insecure", action="store_true", help="allow plain HTTP on a non-loopback --host (tokens "
                                                            "in clear)")
    ap.add_argument("--public-metrics", action="store_true", help="/metrics without a token")
    args = ap.parse_args(argv)
    refusal = check_serving(args.host, args.tls_cert, args.tls_key, args.insecure)
    if refusal:
        print(f"llmos serve-http: {refusal}", file=sys.stderr)
        return 2
    socket = args.socket or os.environ.get("LLMOS_SOCKET")
    app = make_app(socket, args.token, args.max_body, args.workers, args.metrics_token, args.public_metrics)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", log_config=log_config(),
                access_log=False, ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key)   # RequestId logs access
    return 0
