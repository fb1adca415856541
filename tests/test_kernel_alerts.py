"""Kernel health: stat's counters and latency histograms, and alerts with a long-poll subscription."""
from __future__ import annotations

import threading
import time

import pytest

from conftest import errno_of

ARGS = ("--device", "cpu", "--dtype", "float32", "--kv-blocks", "16", "--block-size", "4")


def test_stat_counts_calls_tokens_and_latency_by_priority(start_kernel):
    k = start_kernel(*ARGS, model="default")
    with k.client() as c:
        for nice in (-5, 5):
            c.wait(c.spawn(prompt="hello there", max_tokens=6, priority=nice, ignore_eos=True))
        assert errno_of(c.kill, 4242) == "ESRCH"
        s = c.stat()
        assert s["tokens_out"] == 12 and s["tokens_in"] > 0
        assert s["calls"]["spawn"] == 2 and s["call_errors"] == {"kill": 1}
        for nice in ("-5", "5"):
            ttft, itl = s["latency"]["ttft"][nice], s["latency"]["itl"][nice]
            assert ttft["count"] == 1 and ttft["counts"][-1] <= 1 and ttft["sum"] > 0
            assert itl["count"] == 5 and itl["counts"] == sorted(itl["counts"])
            assert len(ttft["buckets"]) == len(ttft["counts"])


def test_alerts_fire_resolve_and_reach_a_subscriber(start_kernel):
    k = start_kernel(*ARGS, "--alert", "kv_usage=0.5", model="default")
    with k.client() as c:
        first = c.alerts()
        assert first["active"] == [] and first["thresholds"]["kv_usage"] == 0.5
        got = {}

        def subscribe():
            with k.client() as sub:
                got["reply"] = sub.alerts(since=first["seq"], wait=60.0)
        t = threading.Thread(target=subscribe)
        t.start()
        pid = c.spawn(prompt="x " * 20, max_tokens=20, interactive=True, ignore_eos=True)   # > half the pool
        list(c.read(pid))
        t.join(60)
        events = got["reply"]["events"]
        assert events[0]["name"] == "kv_usage" and events[0]["state"] == "firing", events
        assert "kv_usage" in {a["name"] for a in c.alerts()["active"]}
        seq = c.alerts()["seq"]
        c.kill(pid)
        c.wait(pid)
        resolved = c.alerts(since=seq, wait=30.0)["events"]
        assert resolved and resolved[0]["state"] == "resolved"
        quiet = c.alerts(since=resolved[-1]["seq"], wait=0.6)          # nothing new: answers at the deadline
        assert quiet["events"] == [] and quiet["active"] == []


def test_alert_thresholds_are_admin_only_and_checked(start_kernel):
    k = start_kernel(model="none")
    with k.client() as c:
        assert c.alert_set(name="queue_wait_s", threshold=2.0)["thresholds"]["queue_wait_s"] == 2.0
        assert errno_of(c.alert_set, name="nope", threshold=1.0) == "EINVAL"
        with k.client(c.user_add(name="eve")["token"]) as eve:
            assert errno_of(eve.alert_set, name="kv_usage", threshold=0.1) == "EPERM"
            assert eve.alerts()["thresholds"]["queue_wait_s"] == 2.0


def test_a_bad_alert_flag_stops_the_boot_with_a_message():
    from llmos.kernel.boot import parse_args
    with pytest.raises(SystemExit) as e:
        parse_args(["--alert", "kv_usage=lots"])
    assert "NAME=VALUE" in str(e.value)
    assert parse_args(["--alert", "swap_rate=2"]).alerts == {"swap_rate": 2.0}


def test_a_subscriber_learns_the_kernel_is_shutting_down(start_kernel):
    k = start_kernel(model="none")
    got = {}
    with k.client() as c:
        seq = c.alerts()["seq"]

        def subscribe():
            with k.client() as sub:
                try:
                    sub.alerts(since=seq, wait=60.0)
                except Exception as err:          # noqa: BLE001 - the errno is what we check
                    got["errno"] = getattr(err, "errno", repr(err))
        t = threading.Thread(target=subscribe)
        t.start()
        time.sleep(0.5)
        c.shutdown()
        t.join(30)
    assert got["errno"] == "ECANCELED"
