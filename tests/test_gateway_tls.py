"""The gateway, made safe to expose (issue 15): HTTPS with a certificate made at test time and the
official ``openai`` client trusting its CA; plain HTTP on a non-loopback host refused without
--insecure; /metrics behind an admin or metrics token; an x-request-id on every response."""
import logging
import os
import socket
import ssl
import subprocess
import sys

import httpx
import openai
import pytest
import trustme
from conftest import KernelProc, wait_for
from llmos.userland.gateway import make_app
from starlette.testclient import TestClient

MODEL = "llmos-tiny-random"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def kernel():
    k = KernelProc("--device", "cpu", "--dtype", "float32", model="default").start()
    yield k
    k.cleanup()


def serve_http(kernel, *args: str) -> subprocess.Popen:
    env = {**os.environ, "LLMOS_SOCKET": kernel.socket, "LLMOS_STATE_DIR": str(kernel.state)}
    return subprocess.Popen([sys.executable, "-m", "llmos.userland.cli", "serve-http", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_https_with_a_test_ca_serves_the_openai_client(kernel, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    port = free_port()
    gw = serve_http(kernel, "--port", str(port), "--tls-cert", str(tmp_path / "cert.pem"),
                    "--tls-key", str(tmp_path / "key.pem"))
    try:
        base = f"https://127.0.0.1:{port}"
        with httpx.Client(verify=ssl.create_default_context(cafile=str(tmp_path / "ca.pem")), timeout=60) as h:
            def up():
                try:
                    return h.get(base + "/health").status_code == 200
                except httpx.HTTPError:
                    return False
            wait_for(up, timeout=60)
            client = openai.OpenAI(base_url=base + "/v1", api_key=kernel.token, http_client=h, max_retries=0)
            r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
            assert r.choices[0].message.content is not None and r.usage.completion_tokens >= 1
        with pytest.raises(httpx.HTTPError):                     # plain HTTP to the TLS port
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
        with pytest.raises(httpx.HTTPError):                     # a client that does not trust the CA
            httpx.get(base + "/health", timeout=10)
    finally:
        gw.terminate()
        gw.wait(30)


def test_plain_http_on_another_interface_needs_insecure(kernel, tmp_path):
    r = subprocess.run([sys.executable, "-m", "llmos.userland.cli", "serve-http", "--host", "0.0.0.0",
                        "--port", str(free_port())], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "LLMOS_SOCKET": kernel.socket})
    assert r.returncode != 0 and "refusing to serve plain HTTP on 0.0.0.0" in r.stderr
    r = subprocess.run([sys.executable, "-m", "llmos.userland.cli", "serve-http", "--tls-cert", "x.pem"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "go together" in r.stderr
    (tmp_path / "bad.pem").write_text("not a certificate")
    r = subprocess.run([sys.executable, "-m", "llmos.userland.cli", "serve-http", "--tls-cert",
                        str(tmp_path / "bad.pem"), "--tls-key", str(tmp_path / "bad.pem")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "cannot use the TLS certificate" in r.stderr and "Traceback" not in r.stderr
    port = free_port()
    gw = serve_http(kernel, "--host", "0.0.0.0", "--port", str(port), "--insecure")
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/health"), timeout=60)
    finally:
        gw.terminate()
        out = gw.communicate(timeout=30)[0]
    assert "WARNING: plain HTTP on 0.0.0.0 (--insecure)" in out
    assert '"GET /health HTTP/1.1" 200 request_id=req_' in out        # the access log names each request


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_metrics_need_an_admin_or_metrics_token_and_every_response_has_a_request_id(kernel):
    with kernel.client() as root:
        plain = root.user_add("plain")["token"]
        scraper = root.user_add("scraper", caps=["metrics"])["token"]
    with TestClient(make_app(kernel.socket, metrics_token=kernel.token)) as tc:
        assert tc.get("/metrics").status_code == 401
        assert tc.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        r = tc.get("/metrics", headers={"Authorization": f"Bearer {plain}"})
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        for token in (kernel.token, scraper):
            r = tc.get("/metrics", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200 and "llmos_kernel_up 1.0" in r.text
        assert tc.get("/metrics", headers={"x-request-id": "mine-42"}).headers["x-request-id"] == "mine-42"
        a, b = tc.get("/health").headers["x-request-id"], tc.get("/health").headers["x-request-id"]
        assert a and b and a != b
        assert tc.get("/health", headers={"x-request-id": "bad id\x7f"}).headers["x-request-id"] != "bad id\x7f"
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
        with tc.stream("POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {kernel.token}",
                                                                           "x-request-id": "stream-1"}) as r:
            assert r.status_code == 200 and r.headers["x-request-id"] == "stream-1"
            assert "[DONE]" in "".join(r.iter_text())
    with TestClient(make_app(kernel.socket, metrics_token=kernel.token, public_metrics=True)) as tc:
        assert tc.get("/metrics").status_code == 200


def test_unknown_tokens_on_metrics_keep_no_client_open(kernel):
    app = make_app(kernel.socket, metrics_token=kernel.token)
    with TestClient(app) as tc:
        for i in range(5):
            assert tc.get("/metrics", headers={"Authorization": f"Bearer guess-{i}"}).status_code == 401
        assert app.state.gateway.pool.num_idle() == 0       # each one kept would hold a kernel socket open


def test_access_and_error_logs_carry_the_request_id(kernel, caplog):
    app = make_app(kernel.socket, metrics_token=kernel.token)

    async def broken(token):
        raise RuntimeError("a gateway bug")
    app.state.gateway.models_now = broken
    with caplog.at_level(logging.INFO, logger="llmos.gateway"), TestClient(app) as tc:
        assert tc.get("/health", headers={"x-request-id": "log-me"}).status_code == 200
        r = tc.get("/v1/models", headers={"Authorization": f"Bearer {kernel.token}", "x-request-id": "oops-7"})
        assert r.status_code == 500 and r.headers["x-request-id"] == "oops-7"
    lines = [rec.getMessage() for rec in caplog.records]
    assert any('"GET /health HTTP/1.1" 200 request_id=log-me' in line for line in lines), lines
    assert any("error serving /v1/models (request_id=oops-7)" in line for line in lines), lines
