"""Memory leases against the model manager's budget: granted beside models, idle models
evicted for them, refused clearly, revoked for inference at the same or higher priority."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from llmos.kernel.leases import LeaseState
from llmos.kernel.models import ModelEntry, ModelManager, Where
from llmos.syscalls.errors import SyscallError


class Driver:
    def adapter_bytes(self):
        return {"device": 0, "host": 0}

    def to_host(self):
        pass


def manager(budget=1000):
    cfg = SimpleNamespace(device_budget=budget, host_budget=10_000, reserve_fraction=0.0, aliases={},
                          kv_blocks=None, block_size=16, dtype=None)
    device = SimpleNamespace(free_bytes=lambda: budget, kind="cpu")
    mm = ModelManager(cfg, device, make_engine=None, park=lambda entry, nice: False)
    mm.min_kv_bytes = lambda entry: 100
    return mm


def on_device(mm, name, weights=300, kv=100, busy=False, pinned=False):
    sched = SimpleNamespace(pids={1: None} if busy else {})
    e = ModelEntry(name, name, where=Where.DEVICE, weight_bytes=weights, pinned=pinned)
    e.engine = SimpleNamespace(kv_bytes=kv, driver=Driver(), sched=sched)
    mm.entries[name] = e
    return e


def test_leases_fit_beside_models_and_evict_idle_ones():
    mm = manager()
    a = on_device(mm, "a")
    first = mm.leases.grant(mm, "svc:tuner", 500, 10, "x")
    assert a.where is Where.DEVICE and mm.free_bytes() == 100
    mm.leases.grant(mm, "svc:tuner", 400, 10, "y")          # only with the idle model gone
    assert a.where is Where.HOST and mm.free_bytes() == 100
    mm.leases.release("svc:tuner", first.id)
    assert mm.free_bytes() == 600


def test_refusals_say_why():
    mm = manager()
    on_device(mm, "pinned", weights=500, kv=100, pinned=True)
    on_device(mm, "busy", weights=200, kv=100, busy=True)
    with pytest.raises(SyscallError) as never:
        mm.leases.grant(mm, "svc:tuner", 500, 0, "")
    assert never.value.errno == "ENOMEM" and "can never fit" in never.value.message
    with pytest.raises(SyscallError) as later:
        mm.leases.grant(mm, "svc:tuner", 200, 0, "")
    assert later.value.errno == "EAGAIN" and "try again" in later.value.message
    with pytest.raises(SyscallError) as other:
        mm.leases.release("svc:other", 99)
    assert other.value.errno == "ENOENT"


def test_a_model_load_revokes_less_or_equally_important_leases_and_waits_for_them():
    mm = manager()
    background = mm.leases.grant(mm, "svc:tuner", 500, 10, "")
    important = mm.leases.grant(mm, "svc:tuner", 300, -10, "")
    new = ModelEntry("b", "b", weight_bytes=300)
    assert mm.make_room(new, nice=0) is False                 # waits for the lease to come back
    assert background.state is LeaseState.REVOKED and important.state is LeaseState.HELD
    assert mm.make_room(new, nice=0) is False                 # not released yet: still waiting
    mm.leases.release("svc:tuner", background.id)
    assert mm.make_room(new, nice=0) is True
    assert mm.make_room(ModelEntry("c", "c", weight_bytes=650), nice=0) is False
    assert important.state is LeaseState.HELD                          # more important than the load


def test_a_holder_that_goes_away_loses_its_leases():
    mm = manager()
    mm.leases.grant(mm, "svc:tuner", 500, 0, "")
    mm.leases.drop_holder("svc:tuner")
    assert mm.leases.rows() == [] and mm.free_bytes() == 1000


def test_a_revoked_lease_not_released_in_time_is_taken_back(monkeypatch):
    from llmos.kernel import leases
    mm = manager()
    lease = mm.leases.grant(mm, "svc:tuner", 500, 10, "")
    assert mm.leases.revoke_for(0, 500) == 500 and lease.state is LeaseState.REVOKED
    assert mm.leases.expire() is False                        # within the grace period: still counted
    monkeypatch.setattr(leases, "REVOKE_GRACE_S", -1.0)
    assert mm.leases.expire() is True and mm.free_bytes() == 1000
