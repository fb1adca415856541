"""The second half of ``llmos demo``: the tuner changes the model's answers, alerts, and the
OpenAI-compatible gateway answering the official ``openai`` client."""
from __future__ import annotations

import json
import socket as _socket
import threading
import time

from llmos.syscalls.errors import SyscallError

QA = [("What is the capital of France?", " Paris"), ("Who wrote Hamlet?", " Shakespeare"),
      ("What color is the sky?", " blue"), ("What do cows drink?", " water")]
TUNE = dict(rank=8, alpha=16, lr=1e-2, epochs=40, batch_size=8, seed=0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def _answer(c, prompt: str, adapter: str | None = None) -> str:
    return c.wait(c.spawn(prompt=prompt, max_tokens=16, adapter=adapter))["text"]


def _services_up(c, names: set[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while {s["name"] for s in c.svc_list() if s["state"] == "up"} < names and time.monotonic() < deadline:
        time.sleep(0.1)


def tuner(c, say, show) -> None:
    say("tuner: a LoRA job on a dataset in the file store changes the model's answers")
    _services_up(c, {"fs", "tuner"})
    data = "".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in QA).encode()
    c.call("fs_put", path="data/qa.jsonl", data=data)
    before = [_answer(c, q) for q, _ in QA]
    job = c.call("tune_submit", dataset="data/qa.jsonl", params=TUNE, val_fraction=0.0, name="qa")
    print(f"  tune_submit data/qa.jsonl ({job['num_train']} pairs) -> job {job['job']}, "
          f"adapter to {job['adapter']}/ in your file store")
    last = None
    while (st := c.call("tune_status", job=job["job"]))["state"] not in ("done", "failed", "cancelled"):
        if st["step"] and st["step"] != last and st["step"] % 10 == 0:
            last = st["step"]
            print(f"  {st['state']}: step {st['step']}/{st['total_steps']}, loss {st['loss']:.3f}, "
                  f"{st['tokens_per_s'] or 0:.0f} tokens/s")
        time.sleep(0.2)
    if st["state"] != "done":
        print(f"  the job ended {st['state']}: {st['error']}")
        return
    print(f"  done: validation loss {st['initial_eval_loss']:.2f} -> {st['eval_loss']:.3f}; "
          f"files: {', '.join(f['path'].rsplit('/', 1)[1] for f in c.call('fs_list', prefix='adapters/qa'))}")
    for (q, _), b in zip(QA, before):
        print(f"  {q:32} base: {show(b)[:14]!r:18} with adapters/qa: {_answer(c, q, 'adapters/qa')!r}")


def alerts(c, say) -> None:
    say("alerts: thresholds on KV usage, queue wait, swap rate, services; programs subscribe by long poll")
    seq = c.alerts()["seq"]
    c.alert_set(name="kv_usage", threshold=0.001)            # any KV in use: fires at once
    pid = c.spawn(prompt="Tell me a story", max_tokens=64, interactive=True, ignore_eos=True)
    got = c.alerts(since=seq, wait=10.0)
    for e in got["events"]:
        print(f"  event {e['seq']}: {e['name']} {e['state']} ({e['message']})")
    c.kill(pid)
    c.wait(pid)
    c.alert_set(name="kv_usage", threshold=0.95)


def gateway(c, socket: str, token: str, say) -> None:
    say("gateway: `llmos serve-http`, an OpenAI-compatible server; here the official openai client")
    import uvicorn
    from llmos.userland.gateway import make_app
    with _socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(socket, default_token=token), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        model = c.uname()["models"][0]["name"]
        try:
            import openai
        except ImportError:
            print("  (pip install openai to see this step)")
            return
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=token)
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi!"}],
                                           max_tokens=12, temperature=0, extra_body={"priority": -5})
        print(f"  POST /v1/chat/completions -> {r.object}, finish_reason {r.choices[0].finish_reason}, "
              f"usage {r.usage.prompt_tokens}+{r.usage.completion_tokens} tokens")
        n = client.completions.create(model=model, prompt="Once upon a time", max_tokens=6, n=3, seed=1)
        print(f"  n=3 (served by fork): {len({ch.text for ch in n.choices})} distinct samples")
        try:
            client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
        except openai.NotFoundError as err:
            print(f"  unknown model: HTTP {err.status_code}, {err.body.get('code')}")
    except SyscallError as err:
        print(f"  {err.errno}: {err.message}")
    finally:
        server.should_exit = True
        thread.join(10)
