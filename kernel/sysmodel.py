"""Model syscalls: load, unload, list, and the memory budgets (``free``)."""
from __future__ import annotations

import time

from llmos.kernel import objects
from llmos.kernel.models import Where
from llmos.kernel.procio import PENDING_REPLY
from llmos.syscalls.errors import SyscallError


def _models(k):
    if k.procs.models is None:
        raise SyscallError("ENOENT", "this kernel runs without models (--model none)")
    return k.procs.models


def sys_model_load(k, call):
    mm = _models(k)
    objects.check_pin(call.user, call.args["pin"])
    entry = objects.resolve_model(k.procs, call.user, call.args["name"])
    if mm.fault(entry, pin=call.args["pin"]):
        return models_row(k, entry, call.user)
    if not entry.loading:
        raise SyscallError("EAGAIN", f"model {entry.name!r} does not fit until busy models' processes end; "
                                     f"free {mm.free_bytes()} bytes, it needs {entry.weight_bytes} + KV")

    def answer(error):                       # when the load ends (admit_loaded)
        k.outbox.fail(call, error) if error is not None else k.outbox.reply(call, models_row(k, entry, call.user))
    k.procs.on_loaded(entry, answer)
    return PENDING_REPLY


def sys_model_unload(k, call):
    name = call.args["name"]
    ps = k.procs
    entry = objects.resolve_model(ps, call.user, name)
    if entry is ps.default:
        raise SyscallError("EBUSY", f"{entry.name!r} is the kernel's default model")
    objects.check_unload(call.user, entry, k.table.of_model(entry))
    _models(k).unload(entry.name)
    return True


def sys_models(k, call):
    _models(k)
    return model_list(k, call.user)


def sys_free(k, call):
    mm = _models(k)
    on_device = [e for e in mm.entries.values() if e.where is Where.DEVICE]
    weights = sum(e.weight_bytes for e in on_device)
    kv = sum(e.engine.kv_bytes for e in on_device)
    adapters = [e.engine.driver.adapter_bytes() for e in on_device]
    host_weights = sum(e.weight_bytes for e in mm.entries.values() if e.where is Where.HOST)
    return {"device": {"budget": mm.device_budget, "weights": weights, "kv": kv,
                       "adapters": sum(a["device"] for a in adapters), "reserve": mm.reserve,
                       "free": mm.free_bytes()},
            "host": {"budget": mm.host_budget, "weights": host_weights,
                     "adapters": sum(a["host"] for a in adapters), "free": mm.host_budget - host_weights}}


def models_row(k, e, viewer) -> dict:
    """One row of ``models`` as ``viewer`` may see it: where a model's weights are, who owns
    and uses it, and the viewer's adapters on it (everyone's, with ``host``)."""
    d = e.engine.driver if e.engine else e.host_driver
    arch = (e.config.architectures or ["?"])[0] if e.config is not None else None   # an alias not read yet
    name_of = k.users.name_of
    return objects.model_view({"name": e.name, "path": e.path, "owner": name_of(e.owner_uid), "architecture": arch,
            "params": d.num_params if d else None, "dtype": d.dtype if d else None, "where": e.where.value,
            "loading": e.loading, "bytes": e.weight_bytes, "kv_bytes": e.engine.kv_bytes if e.engine else 0,
            "pinned": e.pinned, "random_weights": e.random_weights, "default": e is k.procs.default,
            "last_used_s_ago": round(time.monotonic() - e.last_used, 3) if e.last_used else None,
            "processes": len(k.table.of_model(e)),
            "adapters": objects.visible_adapters(e, viewer, name_of) if e.engine else []}, viewer)


def model_list(k, viewer) -> list[dict]:
    """The models ``viewer`` may see (see ``objects``)."""
    return [models_row(k, e, viewer) for e in objects.visible_models(k.procs, viewer)]
