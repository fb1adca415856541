"""Objects with owners: who may name, see, pin and unload models and adapters.

Every model entry and every loaded adapter has an owner uid. Root's objects (the boot model,
``--alias`` models, whatever root loads) are the shared base models; other users' are theirs.
The policy, stated once:

* Without the ``host`` capability a user names a model by a name they may see (a shared one or
  their own) and an adapter by its file-store path (``adapters/x``, exported by ``userfs``) or
  by a loaded adapter of their own. Anything else that looks like a host path or a hub id is
  ``EPERM`` — decided from the string alone, *before* the filesystem is looked at, so a refusal
  says nothing about what is on the host.
* A user sees (``models``, ``uname``, ``meminfo``) the models they may use and only their own
  adapters, never a host path: paths are ``None``, an exported adapter is shown by its
  file-store path. Error messages about adapters name them the same way.
* Pinning a model, and unloading a model another user owns or has processes on, need ``host``.

Holders of ``host`` (root has every capability) see and may do everything; so may services
(``svc``) see everything, as the tuner must read base-model paths.
"""
from __future__ import annotations

import logging
import os

from llmos.kernel import audit
from llmos.kernel.models import AdapterRecord, ModelEntry, canonical
from llmos.kernel.security import ROOT_UID, User
from llmos.syscalls.errors import SyscallError
from llmos.syscalls.table import HOST_CAP, SERVICE_CAP

log = logging.getLogger("llmos.kernel")


def has_host(user: User) -> bool:
    return user.is_root or HOST_CAP in user.caps


def sees_all(user: User) -> bool:
    return has_host(user) or SERVICE_CAP in user.caps


def _need_host(user: User, what: str) -> SyscallError:
    return SyscallError("EPERM", f"{what} needs capability '{HOST_CAP}', which user {user.name} lacks")


def looks_like_host_path(name: str) -> bool:
    """A path or a hub id rather than a model's name: judged from the string only."""
    return name.startswith(("/", ".", "~")) or "/" in name


# -- models ---------------------------------------------------------------------------------
def can_see(user: User, entry: ModelEntry) -> bool:
    return sees_all(user) or entry.owner_uid in (ROOT_UID, user.uid)


def resolve_model(ps, user: User, name: str | None) -> ModelEntry:
    """The model ``name`` for ``user``: the default, a name they may see, or — with ``host`` —
    any path or hub id (a new entry is theirs). Without ``host`` an unknown plain name is
    ``ENOENT`` listing what they may use, and a path or hub id is ``EPERM``; neither touches
    the filesystem, and no message carries a host path."""
    if name in (None, "default") or ps.models is None:
        return ps.entry(name)
    entry = ps.models.entries.get(name)
    if has_host(user):
        return ps.models.resolve(name, owner_uid=user.uid)
    if entry is not None and can_see(user, entry):
        try:
            return ps.entry(name)
        except SyscallError as err:          # its files are the operator's: say so, not where
            log.warning("model %s for user %s: %s", name, user.name, err.message)
            raise SyscallError(err.errno, f"model {name!r} cannot be read (the kernel's log says why)")
    if looks_like_host_path(name):
        raise _need_host(user, f"model {name!r} is a host path or hub id: naming one")
    known = ", ".join(sorted(e.name for e in ps.models.entries.values() if can_see(user, e))) or "none"
    raise SyscallError("ENOENT", f"unknown model {name!r} (known: {known})")


def check_pin(user: User, pin: bool) -> None:
    if pin and not has_host(user):
        raise _need_host(user, "model_load(pin=True)")


def check_unload(user: User, entry: ModelEntry, procs) -> None:
    """``procs``: the model's processes. The owner may unload an unused model of theirs;
    another user's, or one with another user's processes, needs ``host``."""
    others = any(p.uid != user.uid for p in procs)
    if (entry.owner_uid != user.uid or others) and not has_host(user):
        raise _need_host(user, f"unloading model {entry.name!r}, which "
                               f"{'other users use' if others else 'another user loaded'},")


def visible_models(ps, user: User) -> list[ModelEntry]:
    return [e for e in ps.models.entries.values() if can_see(user, e)] if ps.models is not None else []


def visible_engines(ps, user: User) -> list:
    """The resident engines of the models ``user`` may see."""
    names = {e.name for e in visible_models(ps, user)}
    return [e for e in ps.engines() if e.name in names]


def model_view(row: dict, user: User) -> dict:
    """A ``models`` row as ``user`` may see it: no host path without ``host``."""
    return row if sees_all(user) else {**row, "path": None}


# -- adapters -------------------------------------------------------------------------------
def _loaded(entry: ModelEntry) -> list[dict]:
    driver = entry.engine.driver if entry.engine is not None else entry.host_driver
    return driver.adapters() if driver is not None else []


def check_adapter(entry: ModelEntry, user: User, given: str | None, a: dict) -> dict:
    """Spawn arguments ``a`` with their adapter checked for ``user`` and its owner recorded on
    ``entry``. ``given`` is the adapter as the caller wrote it; ``a["adapter"]`` differs from it
    when ``userfs`` exported it from the caller's file store (then it is theirs). Otherwise it
    must be a recorded adapter of theirs, or ``host`` lets them name any directory (made
    canonical). Nothing here touches the filesystem before that check."""
    adapter = a["adapter"]
    if adapter is None:
        return a
    if given != adapter:                  # exported into <state>/cache/adapters/<uid>/: the caller's
        entry.adapter_records[adapter] = AdapterRecord(user.uid, given.strip("/"))
        return a
    record = entry.adapter_records.get(adapter)
    if record is not None and record.owner_uid == user.uid:
        return a
    if not has_host(user):
        raise _need_host(user, f"adapter {adapter!r} is not a file-store path (adapters/NAME) or an "
                               f"adapter of yours: naming a host directory")
    adapter = canonical(adapter)
    _claim(entry, adapter, AdapterRecord(user.uid, adapter))
    return {**a, "adapter": adapter}


def _claim(entry: ModelEntry, adapter: str, record: AdapterRecord) -> None:
    """A loaded adapter keeps its owner; one not loaded (yet) is the spawner's."""
    current = entry.adapter_records.get(adapter)
    if current is None or all(x["name"] != adapter for x in _loaded(entry)) or \
            current.owner_uid == record.owner_uid:
        entry.adapter_records[adapter] = record


def adapter_label(models, user: User, model: str, adapter: str | None) -> str | None:
    """How ``user`` may see a process's adapter: as given, or by its file-store path."""
    if adapter is None or models is None or sees_all(user):
        return adapter
    entry = models.entries.get(model)
    record = entry.adapter_records.get(adapter) if entry is not None else None
    return record.label if record is not None else None


def visible_adapters(entry: ModelEntry, user: User, name_of) -> list[dict]:
    """The adapters loaded on ``entry`` that ``user`` may see, each with its ``owner``
    (``name_of(uid)``): all with ``host``, else their own, by label and without host paths."""
    rows = []
    for x in _loaded(entry):
        record = entry.adapter_records.get(x["name"])
        owner = record.owner_uid if record is not None else ROOT_UID
        if sees_all(user):
            rows.append({**x, "owner": name_of(owner)})
        elif owner == user.uid:
            rows.append({**x, "name": record.label, "path": None, "owner": name_of(owner)})
    return rows


def load_adapter(models, engine, adapter: str) -> None:
    """Make adapter ``adapter`` known to ``engine``'s driver: by name if loaded, else from its
    directory (missing -> ENOENT, mismatched or corrupt -> EINVAL). Messages name it by its
    label, so an exported adapter is reported by its file-store path, not the kernel's cache."""
    if any(x["name"] == adapter for x in engine.driver.adapters()):
        return
    entry = models.entries.get(engine.name) if models is not None else None
    record = entry.adapter_records.get(adapter) if entry is not None else None
    label = record.label if record is not None else adapter
    try:
        engine.driver.load_adapter(adapter, adapter)
        audit.event("adapter_load", model=engine.name, adapter=label,
                    owner_uid=record.owner_uid if record is not None else None)
    except FileNotFoundError as exc:
        raise SyscallError("ENOENT", f"adapter {label!r}: {_scrub(exc, adapter, label)}"[:300])
    except (ValueError, KeyError, OSError) as exc:
        raise SyscallError("EINVAL", f"adapter {label!r} does not fit model {engine.name!r}: "
                                     f"{_scrub(exc, adapter, label)}"[:400])


def _scrub(exc: Exception, adapter: str, label: str) -> str:
    text = str(exc)
    for spelling in sorted({adapter, os.path.abspath(adapter)}, key=len, reverse=True):
        text = text.replace(spelling, label)
    return text.removeprefix(f"adapter {label!r}: ")
