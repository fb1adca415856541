"""The OpenAI wire format for the gateway: the bearer token and JSON body of a request, the
body checked and turned into a ``Job`` (spawn arguments and how to answer), the answer's JSON
shapes, and ``ApiError`` (with the HTTP status of each kernel errno).

Every bad input is an ``ApiError`` (HTTP 400 with the offending ``param``), never a traceback.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field

from llmos.syscalls.errors import SyscallError

MAX_TOKENS_LIMIT = 1 << 20
MAX_N = 16
MAX_STOPS = 16
TRANSPORT_ERRNOS = {"ECONNREFUSED", "ETIMEDOUT", "ECONNRESET"}     # the client is unusable afterwards
HTTP_STATUS = {"EINVAL": 400, "E2BIG": 400, "EMSGSIZE": 413, "EACCES": 401, "EPERM": 403, "ENOENT": 404,
               "ESRCH": 404, "EAGAIN": 429, "EDQUOT": 429, "ENOMEM": 503, "EBUSY": 503}


class ApiError(Exception):
    """An answer in OpenAI's error shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def api_error_of(err: SyscallError) -> ApiError:
    """The HTTP answer to a kernel refusal."""
    if err.errno in TRANSPORT_ERRNOS:
        return ApiError(503, f"kernel unavailable: {err.message}", "server_error", code="kernel_unavailable")
    status = HTTP_STATUS.get(err.errno, 500)
    kind = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return ApiError(status, err.message, kind, code=err.errno)


def bearer_token(header: str | None, default_token: str | None) -> str:
    """The llmos token of a request: its ``Authorization: Bearer`` value, else the default."""
    if header is None:
        if default_token is None:
            raise ApiError(401, "missing bearer token (Authorization: Bearer <llmos token>)",
                           "authentication_error", code="invalid_api_key")
        return default_token
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "the Authorization header must be 'Bearer <llmos token>'",
                       "authentication_error", code="invalid_api_key")
    return token.strip()


async def read_json(request, limit: int) -> dict:
    """The request body as a JSON object; 413 past ``limit`` bytes (read no further), else 400."""
    too_big = ApiError(413, f"request body over {limit} bytes", code="request_too_large")
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise too_big
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise too_big
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed JSON body: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _bad(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param}: {why}", param=param, code="invalid_value")


def _int(body: dict, name: str, lo: int, hi: int, default=None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _bad(name, f"must be an integer from {lo} to {hi}")
    return v


def _float(body: dict, name: str, lo: float, hi: float, default=None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise _bad(name, f"must be a number from {lo} to {hi}")
    return float(v)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, "must be true or false")
    return v


def _messages(v) -> list[dict]:
    if not isinstance(v, list) or not v:
        raise _bad("messages", "must be a non-empty list of {role, content}")
    out = []
    for m in v:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad("messages", "every message needs a string role")
        content = m.get("content")
        if isinstance(content, list):     # content parts: only text ones are supported
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _bad("messages", "only text content parts are supported")
            content = "".join(p["text"] for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise _bad("messages", "content must be a string or a list of text parts")
        out.append({"role": m["role"], "content": content})
    return out


def _prompt(v) -> dict:
    """A completion prompt as spawn arguments: text, or token ids; one prompt per request."""
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
        v = v[0]
    if isinstance(v, str):
        return {"prompt": v}
    if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v):
        return {"prompt_ids": v}
    raise _bad("prompt", "must be a string, a list of one string, or a list of token ids")


def _stop(v) -> list[str] | None:
    if v is None:
        return None
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", "must be a string or a list of strings")
    stops = [s for s in stops if s]
    if len(stops) > MAX_STOPS:
        raise _bad("stop", f"at most {MAX_STOPS} stop strings")
    return stops or None


@dataclass
class Job:
    """One request: what to spawn (``n`` processes) and how to shape the answer."""
    chat: bool
    model: str
    spawn_args: dict
    n: int = 1
    seed: int | None = None
    priority: int = 0
    stream: bool = False
    include_usage: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def endpoint(self) -> str:
        return "/v1/chat/completions" if self.chat else "/v1/completions"

    def seeds(self) -> list[int | None]:
        """Choice i samples with seed+i, so each choice equals a one-choice request with that seed."""
        return [None if self.seed is None else (self.seed + i) % (1 << 63) for i in range(self.n)]

    def envelope(self, choices: list[dict], stream: bool = False, usage: dict | None = None) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if stream and self.chat else "")
        out = {"id": ("chatcmpl-" if self.chat else "cmpl-") + self.id, "object": kind, "created": self.created,
               "model": self.model, "system_fingerprint": None, "choices": choices}
        if usage is not None or not stream or self.include_usage:
            out["usage"] = usage
        return out

    def choice(self, index: int, text: str, finish_reason: str) -> dict:
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text},
                    "logprobs": None, "finish_reason": _finish(finish_reason)}
        return {"index": index, "text": text, "logprobs": None, "finish_reason": _finish(finish_reason)}

    def delta(self, index: int, text: str, finish_reason: str | None, first: bool = False) -> dict:
        finish = None if finish_reason is None else _finish(finish_reason)
        if self.chat:
            d = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"index": index, "delta": d, "logprobs": None, "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"     # stop, terminated, killed -> stop


def parse_job(body: dict, chat: bool) -> Job:
    """Check an OpenAI request body; unknown fields (user, presence_penalty, ...) are ignored."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model: a model name is required", param="model", code="invalid_value")
    if chat:
        if "messages" not in body:
            raise ApiError(400, "messages: required", param="messages", code="missing_required_parameter")
        source = {"messages": _messages(body["messages"])}
    else:
        if "prompt" not in body:
            raise ApiError(400, "prompt: required", param="prompt", code="missing_required_parameter")
        source = _prompt(body["prompt"])
    if body.get("logprobs") not in (None, False, 0):
        raise _bad("logprobs", "not supported by this gateway")
    max_tokens = _int(body, "max_completion_tokens", 1, MAX_TOKENS_LIMIT) or _int(body, "max_tokens", 1, MAX_TOKENS_LIMIT)
    top_p = _float(body, "top_p", 0.0, 1.0, 1.0)
    seed = _int(body, "seed", -(1 << 63), (1 << 64) - 1)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("stream_options", "must be an object")
    priority = _int(body, "priority", -20, 19, 0)
    spawn = {**source, "model": model, "max_tokens": max_tokens, "priority": priority,
             "temperature": _float(body, "temperature", 0.0, 2.0, 1.0), "top_p": max(top_p, 1e-6),
             "top_k": _int(body, "top_k", 0, MAX_TOKENS_LIMIT), "stop": _stop(body.get("stop")),
             "hup": True}           # if the gateway dies mid-request, its processes end with its session
    return Job(chat=chat, model=model, spawn_args={k: v for k, v in spawn.items() if v is not None},
               n=_int(body, "n", 1, MAX_N, 1), seed=None if seed is None else seed % (1 << 63),
               priority=priority, stream=_bool(body, "stream"),
               include_usage=_bool(options or {}, "include_usage"))
