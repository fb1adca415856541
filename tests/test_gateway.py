"""The OpenAI-compatible gateway against a real kernel on the built-in tiny model, through the
official ``openai`` client and plain HTTP: answers equal the kernel's own, streams equal the
whole answer, every bad input is an OpenAI error, and nothing is lost under load."""
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn
from conftest import KernelProc, wait_for
from llmos.userland.gateway import make_app
from llmos.syscalls.errors import SyscallError
from llmos.userland.gateway_metrics import KernelCollector
from llmos.userland.gateway_request import api_error_of
from prometheus_client import CollectorRegistry, generate_latest
from starlette.testclient import TestClient

MODEL = "llmos-tiny-random"
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def kernel():
    k = KernelProc("--device", "cpu", "--dtype", "float32", model="default").start()
    yield k
    k.cleanup()


@pytest.fixture(scope="module")
def gateway(kernel):
    """The gateway served by uvicorn in a thread on a free port; its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = make_app(kernel.socket, default_token=None, max_body_bytes=MAX_BODY, metrics_token=kernel.token)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=20)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def oai(gateway, kernel):
    return openai.OpenAI(base_url=gateway + "/v1", api_key=kernel.token, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(gateway, kernel):
    with httpx.Client(base_url=gateway, headers={"Authorization": f"Bearer {kernel.token}"}, timeout=60) as h:
        yield h


def kernel_answer(kernel, **spawn) -> dict:
    with kernel.client() as c:
        return c.wait(c.spawn(**spawn), _timeout=60)


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


HELLO = [{"role": "user", "content": "Hello there"}]


def test_chat_greedy_equals_the_kernels_own_answer(oai, kernel):
    r = oai.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    want = kernel_answer(kernel, messages=HELLO, max_tokens=12, temperature=0.0)
    assert r.choices[0].message.content == want["text"] and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == want["finish_reason"] == "length"
    assert r.usage.prompt_tokens == want["usage"]["prompt_tokens"] and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12 and r.model == MODEL


def test_chat_accepts_text_content_parts(oai):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}]
    a = oai.chat.completions.create(model=MODEL, messages=parts, max_tokens=6, temperature=0)
    b = oai.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_streamed_chat_equals_the_whole_answer_and_ends_with_usage(oai):
    whole = oai.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=0)
    chunks = list(oai.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_stream_without_include_usage_has_no_usage_chunk(oai):
    chunks = list(oai.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, stream=True))
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)


def test_completions_equal_the_kernel_and_stream_the_same(oai, kernel):
    want = kernel_answer(kernel, prompt="Once upon a time", max_tokens=10, temperature=0.0)
    r = oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0)
    assert r.choices[0].text == want["text"] and r.usage.completion_tokens == 10
    listed = oai.completions.create(model=MODEL, prompt=["Once upon a time"], max_tokens=10, temperature=0)
    assert listed.choices[0].text == want["text"]
    streamed = oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0,
                                      stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want["text"]


def test_n_choices_with_a_seed_are_each_the_one_choice_answer_with_seed_plus_i(oai):
    kw = {"model": MODEL, "messages": HELLO, "max_tokens": 8, "temperature": 1.0, "seed": 42}
    r = oai.chat.completions.create(n=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) == 3
    for i in range(3):
        assert oai.chat.completions.create(**{**kw, "seed": 42 + i}).choices[0].message.content == texts[i]
    assert r.usage.completion_tokens == 24
    streamed = list(oai.chat.completions.create(n=3, stream=True, **kw))
    by_index = ["".join(c.choices[0].delta.content or "" for c in streamed if c.choices[0].index == i)
                for i in range(3)]
    assert by_index == texts


def test_stop_string_ends_the_answer_before_it(oai):
    whole = oai.completions.create(model=MODEL, prompt="abc", max_tokens=16, temperature=0).choices[0].text
    stop = whole[5:8]
    r = oai.completions.create(model=MODEL, prompt="abc", max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == whole[:whole.index(stop)]
    single = oai.completions.create(model=MODEL, prompt="abc", max_tokens=16, temperature=0, stop=stop)
    assert single.choices[0].text == r.choices[0].text


def test_models_lists_the_kernels_models(oai, http):
    assert MODEL in [m.id for m in oai.models.list().data]
    assert oai.models.retrieve(MODEL).id == MODEL
    assert_openai_error(http.get("/v1/models/nope"), 404, "model_not_found")


def test_priority_extension_is_accepted_and_bounded(oai, http):
    r = oai.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, extra_body={"priority": -10})
    assert r.usage.completion_tokens == 4
    body = {"model": MODEL, "messages": HELLO, "priority": 40}
    assert assert_openai_error(http.post("/v1/chat/completions", json=body), 400)["param"] == "priority"


def test_unknown_model_is_404_model_not_found(oai):
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="gpt-nonexistent", messages=HELLO)
    assert e.value.code == "model_not_found"


def test_bad_or_missing_token_is_401(gateway):
    bad = openai.OpenAI(base_url=gateway + "/v1", api_key="not-a-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=HELLO)
    r = httpx.post(gateway + "/v1/chat/completions", json={"model": MODEL, "messages": HELLO})
    assert_openai_error(r, 401, "invalid_api_key")
    assert_openai_error(httpx.get(gateway + "/v1/models", headers={"Authorization": "Basic x"}), 401)


def test_malformed_json_and_oversize_bodies_are_400_and_413(http):
    assert_openai_error(http.post("/v1/chat/completions", content=b"{not json"), 400, "invalid_json")
    assert_openai_error(http.post("/v1/chat/completions", content=b"[1, 2]"), 400, "invalid_json")
    huge = {"model": MODEL, "prompt": "x" * (MAX_BODY + 1)}
    assert_openai_error(http.post("/v1/completions", json=huge), 413)


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", "12"), ("max_tokens", 2.5), ("max_tokens", True),
    ("temperature", "hot"), ("temperature", 5), ("top_p", 2), ("n", 0), ("n", 1000),
    ("stop", 7), ("stop", ["ok", 3]), ("seed", "x"), ("stream", "yes"), ("messages", "hi"),
    ("messages", [{"content": "no role"}]), ("messages", []), ("model", 5), ("stream_options", 3)])
def test_bad_field_types_are_400_naming_the_field(http, field, value):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 4, field: value}
    err = assert_openai_error(http.post("/v1/chat/completions", json=body), 400)
    assert err["param"] == field or field in err["message"]


def test_missing_prompt_and_kernel_refusals_are_400(http):
    assert_openai_error(http.post("/v1/completions", json={"model": MODEL}), 400, "missing_required_parameter")
    long_prompt = {"model": MODEL, "prompt": "word " * 10000, "max_tokens": 4}     # past the context window
    assert_openai_error(http.post("/v1/completions", json=long_prompt), 400, "EINVAL")


def test_unknown_route_answers_in_openai_shape(http):
    assert_openai_error(http.get("/v1/nothing"), 404)


@pytest.fixture(scope="module")
def alice(kernel) -> str:
    with kernel.client() as c:
        return c.user_add("alice")["token"]


def test_a_stream_runs_as_the_tokens_user_at_its_priority_and_dies_with_its_client(gateway, kernel, alice):
    body = {"model": MODEL, "prompt": "tell me everything", "max_tokens": 100000, "stream": True, "priority": 7}
    with kernel.client() as root:
        with httpx.stream("POST", gateway + "/v1/completions", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {alice}"}) as r:
            for line in r.iter_lines():
                if line.startswith("data:") and '"text":""' not in line:
                    break
            (proc,) = root.ps(all=True)
            assert proc["user"] == "alice" and proc["nice"] == 7
        wait_for(lambda: not root.ps(all=True), timeout=10)      # killed when the client left, and reaped


def test_default_token_serves_requests_without_a_header(kernel, alice):
    with TestClient(make_app(kernel.socket, default_token=alice)) as tc:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        assert tc.post("/v1/completions", json=body).json()["usage"]["completion_tokens"] == 2
        bad = tc.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
        assert_openai_error(bad, 401, "invalid_api_key")


def test_an_unreachable_kernel_is_503(tmp_path):
    with TestClient(make_app(f"ipc://{tmp_path}/none.sock", default_token="x", public_metrics=True)) as tc:
        body = {"model": MODEL, "prompt": "hi"}
        assert_openai_error(tc.post("/v1/completions", json=body), 503, "kernel_unavailable")
        assert tc.get("/health").status_code == 503
        assert "llmos_kernel_up 0.0" in tc.get("/metrics").text


def test_metrics_export_gateway_and_kernel_figures(http, oai):
    oai.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, extra_body={"priority": 5})
    text = http.get("/metrics").text
    for name in ("llmos_gateway_requests_total", "llmos_gateway_ttft_seconds_bucket",
                 "llmos_gateway_itl_seconds_bucket", "llmos_gateway_tokens_out_total", "llmos_kernel_up 1.0",
                 "llmos_gateway_streams 0.0",
                 "llmos_procs", "llmos_kv_blocks", "llmos_model_resident", "llmos_model_weight_bytes",
                 "llmos_memory_bytes", "llmos_syscall_requests_total", "llmos_syscall_errors_total"):
        assert name in text, name
    assert 'llmos_gateway_ttft_seconds_count{priority="5"} 1.0' in text
    out = [line for line in text.splitlines() if line.startswith("llmos_gateway_tokens_out_total")]
    assert out and all(float(line.split()[-1]) > 0 for line in out)
    assert 'endpoint="/v1/chat/completions",status="200"' in text
    # the kernel's own figures (stat): per-call counts, tokens, TTFT by priority as the kernel saw it
    for name in ('llmos_calls_total{call="spawn"}', "llmos_tokens_out_total", "llmos_prefix_hit_tokens_total",
                 'llmos_ttft_seconds_count{priority="5"}', 'llmos_itl_seconds_bucket{le="0.001",priority="5"}'):
        assert name in text, name


def test_health(http):
    assert http.get("/health").json() == {"status": "ok"}


def test_two_hundred_concurrent_requests_all_succeed(gateway, kernel):
    headers = {"Authorization": f"Bearer {kernel.token}"}

    def one(i: int) -> tuple[int, int, str]:
        body = {"model": MODEL, "prompt": f"request {i}", "max_tokens": 4, "temperature": 0,
                "stream": i % 2 == 0}
        with httpx.Client(timeout=120) as h:
            r = h.post(gateway + "/v1/completions", json=body, headers=headers)
            if body["stream"]:
                data = [json.loads(line[6:]) for line in r.text.splitlines()
                        if line.startswith("data: {")]
                return r.status_code, len(data), "".join(d["choices"][0]["text"] for d in data)
            return r.status_code, r.json()["usage"]["completion_tokens"], r.json()["choices"][0]["text"]

    t0 = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(200)))
    assert all(status == 200 for status, _, _ in results), [r for r in results if r[0] != 200][:3]
    assert all(n == 4 for status, n, _ in results[1::2])
    assert results[6][2] == one(6)[2] and one(6)[2] == results[6][2]     # repeatable under load
    assert time.monotonic() - t0 < 60
    with kernel.client() as c:
        assert c.ps() == []                        # every process reaped


def test_kernel_figures_not_yet_reported_are_exported_when_present():
    """Hand-made ``stat`` with the newer fields (latency histograms by nice, calls by name)."""
    stat = {"requests": 10, "errors": 1, "procs": {"RUNNING": 2}, "tokens_in": 50, "tokens_out": 70,
            "swaps": 3, "preemptions": 4, "prefix_hit_tokens": 32, "calls": {"spawn": 5, "read": 5},
            "call_errors": {"spawn": 1},
            "latency": {"ttft": {"-5": {"buckets": [0.01, 0.1, 1.0], "counts": [1, 3, 4], "sum": 0.9, "count": 4}},
                        "itl": {"0": {"buckets": [0.01, float("inf")], "counts": [7, 8], "sum": 0.2, "count": 8}}}}
    registry = CollectorRegistry()
    registry.register(KernelCollector(lambda: {"stat": stat}))
    text = generate_latest(registry).decode()
    for line in ('llmos_procs{state="RUNNING"} 2.0', 'llmos_procs{state="ZOMBIE"} 0.0',
                 "llmos_tokens_in_total 50.0", "llmos_tokens_out_total 70.0", "llmos_swaps_total 3.0",
                 "llmos_preemptions_total 4.0", "llmos_prefix_hit_tokens_total 32.0",
                 'llmos_calls_total{call="spawn"} 5.0', 'llmos_call_errors_total{call="spawn"} 1.0',
                 'llmos_ttft_seconds_bucket{le="0.1",priority="-5"} 3.0',
                 'llmos_ttft_seconds_bucket{le="+Inf",priority="-5"} 4.0', 'llmos_ttft_seconds_count{priority="-5"} 4.0',
                 'llmos_itl_seconds_bucket{le="+Inf",priority="0"} 8.0', 'llmos_itl_seconds_sum{priority="0"} 0.2'):
        assert line in text, line
    older = CollectorRegistry()
    older.register(KernelCollector(lambda: {"stat": {"requests": 1}}))
    assert "llmos_ttft_seconds" not in generate_latest(older).decode()


@pytest.mark.parametrize("errno, status", [("EINVAL", 400), ("E2BIG", 400), ("EACCES", 401), ("EPERM", 403),
                                           ("ENOENT", 404), ("EMSGSIZE", 413), ("EAGAIN", 429), ("ENOMEM", 503),
                                           ("ECONNREFUSED", 503), ("ETIMEDOUT", 503), ("ECONNRESET", 503)])
def test_kernel_errnos_become_http_statuses(errno, status):
    err = api_error_of(SyscallError(errno, "why"))
    assert err.status == status and err.body()["error"]["message"]
