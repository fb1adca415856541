"""The one syscall table.

Every call is declared here once: number, name, argument schema, capability, who serves it,
and whether its reply streams. Argument checking (``check_args``), the client stubs
(``llmos.syscalls.client``), the shell's completion and ``docs/abi.md`` are all derived from
``SYSCALLS``. The kernel maps numbers to handler functions in its own table and refuses to
boot if a kernel-served call has no handler.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmos.syscalls.errors import SyscallError

CAPABILITIES = ("proc", "mm", "fs", "kg", "tune", "prio", "host", "admin", "metrics")   # what users can be granted
# metrics: may read the gateway's /metrics (a metrics-only user holds just this one)
# prio: may use negative nice values (more important than the default), like CAP_SYS_NICE
# host: may name host paths and hub ids (models, adapters), pin models, unload others' models
HOST_CAP = "host"
SERVICE_CAP = "svc"          # held only by a running service's own token, never by a user
CLUSTER = "cluster"          # served_by: calls only a cluster's front answers (``llmos.cluster``)
TYPES = ("int", "float", "str", "bool", "bytes", "list", "map", "any")
_PY_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "str": (str,), "bool": (bool,),
    "bytes": (bytes,), "list": (list, tuple), "map": (dict,), "any": (object,),
}


@dataclass(frozen=True)
class Arg:
    """One argument, or the shape of a list's items or of a map's fields. ``None`` passes for
    an argument that is not ``required`` (its ``default`` is used); list items and required
    fields are never ``None``. A map's ``fields`` are checked when present; other keys pass."""
    name: str
    type: str
    required: bool = False
    default: Any = None
    min: float | None = None          # numbers: inclusive bounds
    max: float | None = None
    max_len: int | None = None        # str/bytes/list/map: length bound
    choices: tuple | None = None
    doc: str = ""
    min_len: int | None = None        # str/bytes/list/map: length bound
    items: "Arg | None" = None        # list: every item's shape
    fields: tuple = ()                # map: the shapes of known keys (Args)

    def __post_init__(self):
        assert self.type in TYPES, self.type
        assert self.items is None or (self.type == "list" and self.items.required), self.name
        assert not self.fields or self.type == "map", self.name

    def shape(self) -> str:
        """The type as docs show it: ``list[int]``, ``list[map{role, content}]``."""
        if self.items is not None:
            return f"list[{self.items.shape()}]"
        if self.fields:
            return "map{" + ", ".join(f.name for f in self.fields) + "}"
        return self.type

    def check(self, value: Any, where: str | None = None) -> Any:
        """The value, checked (``EINVAL``/``E2BIG`` naming ``where``, e.g. ``stop[2]``), with the
        default for ``None``."""
        name = where or self.name
        if value is None:
            if self.required:
                raise SyscallError("EINVAL", f"argument '{name}' is required")
            return self.default
        if (type(value) is int and self.type == "int" and self.choices is None
                and (self.min is None or value >= self.min) and (self.max is None or value <= self.max)):
            return value                     # the common case (token ids), quickly
        py = _PY_TYPES[self.type]
        if not isinstance(value, py) or (isinstance(value, bool) and self.type in ("int", "float")):
            raise SyscallError("EINVAL", f"argument '{name}' must be {self.type}, got {type(value).__name__}")
        if self.type == "float":
            value = float(value)
            if value != value:
                raise SyscallError("EINVAL", f"argument '{name}' is NaN")
        if self.min is not None and value < self.min:
            raise SyscallError("EINVAL", f"argument '{name}' must be >= {self.min}, got {value}")
        if self.max is not None and value > self.max:
            raise SyscallError("EINVAL", f"argument '{name}' must be <= {self.max}, got {value}")
        if self.max_len is not None and len(value) > self.max_len:
            raise SyscallError("E2BIG", f"argument '{name}' longer than {self.max_len}")
        if self.min_len is not None and len(value) < self.min_len:
            raise SyscallError("EINVAL", f"argument '{name}' shorter than {self.min_len}")
        if self.choices is not None and value not in self.choices:
            raise SyscallError("EINVAL", f"argument '{name}' must be one of {list(self.choices)}")
        if self.items is not None:
            return [self.items.check(v, f"{name}[{i}]") for i, v in enumerate(value)]
        if self.fields:
            return {**value, **{f.name: f.check(value.get(f.name), f"{name}.{f.name}")
                                for f in self.fields if f.required or value.get(f.name) is not None}}
        return list(value) if self.type == "list" else value


@dataclass(frozen=True)
class Syscall:
    num: int
    name: str
    args: tuple[Arg, ...] = ()
    cap: str | None = None            # None: any authenticated user
    served_by: str = "kernel"         # "kernel" or the name of the service that serves it
    stream: bool = False              # reply is several frames ending with more=false
    blocking: bool = False            # may wait for the scheduler before replying
    journaled: bool = False           # changes a process: the reply waits for the journal's commit
    doc: str = ""
    returns: str = ""
    arg_by_name: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        assert self.cap is None or self.cap in CAPABILITIES + (SERVICE_CAP,), self.cap
        object.__setattr__(self, "arg_by_name", {a.name: a for a in self.args})


_TOKEN_ID = Arg("token_id", "int", required=True, min=0, max=2**31 - 1)
_MESSAGES = Arg("messages", "list", max_len=4096, doc="chat messages [{role, content}], chat template applied",
                items=Arg("message", "map", required=True, fields=(
                    Arg("role", "str", required=True, max_len=64), Arg("content", "str", required=True))))


def _pid(doc="process id"):
    return Arg("pid", "int", required=True, min=1, max=2**31 - 1, doc=doc)


FEEDBACK_PATH = "feedback.jsonl"   # where feedback() records go in a user's file store (the tuner reads it)
_TEXT = 1 << 20        # longest prompt/text accepted in one call (characters)
_IDS = 1 << 17         # longest token-id list
_SAMPLING = (
    Arg("max_tokens", "int", default=128, min=1, max=1 << 20, doc="tokens to generate per turn"),
    Arg("temperature", "float", default=0.0, min=0.0, max=100.0, doc="0 = greedy"),
    Arg("top_p", "float", default=1.0, min=1e-6, max=1.0),
    Arg("top_k", "int", default=0, min=0, max=1 << 20, doc="0 = no top-k cut"),
    Arg("repetition_penalty", "float", default=1.0, min=0.01, max=10.0),
    Arg("seed", "int", min=0, max=2**63 - 1, doc="same seed -> same output; random if omitted"),
    Arg("stop", "list", max_len=16, doc="stop strings (the output ends before them)",
        items=Arg("stop", "str", required=True, min_len=1, max_len=1024)),
    Arg("stop_token_ids", "list", max_len=64, items=_TOKEN_ID),
    Arg("ignore_eos", "bool", default=False),
)

SYSCALLS: tuple[Syscall, ...] = (
    Syscall(0, "nop", doc="Do nothing; measures round-trip cost and tells the kernel's boot id, frame "
                          "limit (bytes; a larger request gets EMSGSIZE) and session timeout (seconds: a "
                          "client heartbeats its session more often than that). Doubles as the heartbeat.",
            returns="{boot_id, max_frame, session_timeout}"),
    Syscall(1, "uname", doc="Kernel identity: version, ABI version, device, the models you may use.",
            returns="{sysname, version, abi, boot_id, device, models:[{name, architecture, random_weights}]}"),
    Syscall(2, "whoami", doc="The authenticated caller.", returns="{user, uid, caps}"),
    Syscall(3, "stat", doc="Kernel counters: uptime, requests, errors, rejected and dropped frames, calls and "
                           "errors per call, tokens, preemptions, swaps, prefix-cache hits, and histograms of time "
                           "to first token and inter-token latency per priority (cumulative buckets, seconds).",
            returns="{uptime_s, requests, errors, rejects:{errno:count}, frames_dropped, disconnects, procs, steps, "
                    "tokens_generated, tokens_in, tokens_out, preemptions, swaps, recomputes, prefix_hit_tokens, "
                    "calls:{name:n}, call_errors:{name:n}, latency:{ttft|itl:{nice:{buckets, counts, sum, count}}}, "
                    "journal:{enabled, interval_s, commits, bytes_written, restored, lost, damage}}"),
    Syscall(4, "ps", (Arg("all", "bool", default=False, doc="root: include every user's processes"),
                      Arg("lost", "bool", default=False,
                          doc="instead: the processes the journal held that could not be restored at boot, "
                              "with the reason")),
            cap="proc", doc="List your processes.",
            returns="[{pid, ppid, user, state, wait, nice, model, tokens_in, tokens_out, kv_blocks, kv_shared, "
                    "kv_swapped, age_s}]"),
    Syscall(5, "shutdown", (Arg("mode", "str", default="checkpoint", choices=("checkpoint", "drain", "discard"),
                                doc="checkpoint: every process comes back at the next boot; drain: first wait "
                                    "for the non-interactive ones to end (new spawns get EAGAIN); discard: "
                                    "drop them all"),),
            cap="admin", doc="Stop the kernel cleanly after replying.", returns="true"),
    Syscall(6, "user_add", (Arg("name", "str", required=True, max_len=64),
                            Arg("caps", "list", max_len=len(CAPABILITIES), doc="default: all but admin and host",
                                items=Arg("cap", "str", required=True, choices=CAPABILITIES))),
            cap="admin", doc="Create a user and return its first token (shown once).",
            returns="{user, uid, token}"),
    Syscall(7, "user_token", (Arg("name", "str", required=True, max_len=64),), cap="admin",
            doc="Issue a new token for a user (older tokens stay valid).", returns="{user, token}"),
    Syscall(8, "user_list", cap="admin", doc="List users (never their tokens).",
            returns="[{user, uid, caps, num_tokens}]"),
    Syscall(9, "devinfo", cap="mm", doc="Device capacity and telemetry.",
            returns="{kind, name, total_bytes, free_bytes, used_bytes, utilization_pct, temperature_c, power_w}"),
    Syscall(10, "meminfo", cap="mm", doc="KV block pool and swap usage.",
            returns="{block_size, blocks_total, blocks_used, blocks_free, blocks_shared, blocks_cached, "
                    "blocks_swapped, host_blocks_total, bytes_per_block, utilization, ...}"),
    Syscall(11, "spawn", (
        Arg("model", "str", max_len=512, doc="model name or alias (a directory or hub id needs 'host'); "
                                             "default: the kernel's default model"),
        Arg("prompt", "str", max_len=_TEXT, doc="raw text"),
        _MESSAGES,
        Arg("prompt_ids", "list", max_len=_IDS, doc="token ids, fed as they are", items=_TOKEN_ID),
        *_SAMPLING,
        Arg("priority", "int", default=0, min=-20, max=19, doc="nice value: -20 most important"),
        Arg("interactive", "bool", default=False,
            doc="keep the process (and its KV) after each turn; continue it with write"),
        Arg("adapter", "str", max_len=1024,
            doc="LoRA adapter: a directory in your file store (adapters/x), a loaded adapter of yours, or "
                "(with 'host') a peft adapter directory on the host"),
        Arg("kg", "any", doc="true or a graph name (mine, shared, all): put the knowledge graph's facts "
                             "about the entities the prompt mentions before it (needs the kg service)"),
        Arg("kg_budget", "int", default=256, min=1, max=8192, doc="most words of facts to add"),
        Arg("hup", "bool", default=False,
            doc="end (and be reaped) when the spawning session ends without a goodbye, as interactive "
                "processes do; otherwise it runs on"),
        Arg("stopped", "bool", default=False,
            doc="start STOPPED (kill CONT runs it): e.g. fork it at its prompt for n-way sampling"),
    ), cap="proc", journaled=True, doc="Start a generation process. Exactly one of prompt, messages, prompt_ids.",
        returns="pid"),
    Syscall(12, "write", (_pid(), Arg("text", "str", max_len=_TEXT), _MESSAGES,
                          Arg("ids", "list", max_len=_IDS, items=_TOKEN_ID),
                          Arg("max_tokens", "int", min=1, max=1 << 20, doc="for the new turn")),
            cap="proc", journaled=True, doc="Append input to an interactive process waiting for input; starts a new turn.",
            returns="{pid, tokens_in}"),
    Syscall(13, "read", (_pid(), Arg("since", "int", default=0, min=0, max=1 << 30,
                                     doc="output token ids of this turn the caller already has: the stream "
                                         "starts after them (a reader resuming after a restart sees each "
                                         "token once)"),
                         Arg("since_text", "int", default=0, min=0, max=1 << 32,
                             doc="characters of this turn's text the caller already has")),
            cap="proc", stream=True, blocking=True,
            doc="Stream the current turn's output from where it starts (or from since); frames until the turn ends.",
            returns="frames {text, token_ids} ... final {text, token_ids, finish_reason, events}"),
    Syscall(14, "wait", (_pid(), Arg("timeout", "float", min=0.0, max=86400.0,
                                     doc="seconds; ETIMEDOUT when passed (process not reaped)")),
            cap="proc", blocking=True,
            doc="Wait for the process to end and reap it. An interactive process ends after its current turn.",
            returns="{pid, text, token_ids, finish_reason, events, usage:{prompt_tokens, completion_tokens, cached_tokens}, "
                    "accounting:{preemptions, swaps, recomputes}}"),
    Syscall(15, "kill", (_pid(), Arg("sig", "str", default="TERM", choices=("TERM", "KILL", "STOP", "CONT", "INT"))),
            cap="proc", journaled=True, doc="Send a signal: TERM/KILL end it, STOP pauses it (KV swapped first under pressure), CONT "
                            "resumes, INT ends the current turn (an interactive process keeps its KV and waits for "
                            "input: finish_reason 'interrupted'; others end as with TERM).",
            returns="true"),
    Syscall(16, "nice", (_pid(), Arg("value", "int", required=True, min=-20, max=19)), cap="proc", journaled=True,
            doc="Change a process's priority (nice value).", returns="{pid, nice}"),
    Syscall(17, "fork", (_pid(), Arg("n", "int", default=1, min=1, max=64),
                         Arg("seed", "int", min=0, max=2**63 - 1, doc="child i gets seed+i"),
                         Arg("temperature", "float", min=0.0, max=100.0)),
            cap="proc", journaled=True, doc="Clone a live process n times, sharing its full KV blocks copy-on-write.",
            returns="[pid, ...]"),
    Syscall(18, "pinfo", (_pid(),), cap="proc", doc="Everything about one process (its PCB).",
            returns="{pid, ppid, user, state, nice, model, sampling, tokens_in, tokens_out, ...}"),
    Syscall(19, "model_load", (Arg("name", "str", required=True, max_len=512,
                                   doc="model name or alias (a directory or hub id needs 'host')"),
                               Arg("pin", "bool", default=False, doc="never evict it (needs 'host')")),
            cap="mm", blocking=True,
            doc="Bring a model onto the device (evicting idle ones LRU if needed); replies when it is there.",
            returns="{name, path, architecture, params, dtype, where, bytes, kv_bytes, pinned, processes, ...}"),
    Syscall(20, "model_unload", (Arg("name", "str", required=True, max_len=512),), cap="mm",
            doc="Drop a model from device and host memory (EBUSY while processes use it; another user's model, "
                "or one with their processes, needs 'host').", returns="true"),
    Syscall(21, "models", cap="mm", doc="The models you may use (shared ones and your own; with 'host', every "
                                        "one) and where their weights are (device, host, disk).",
            returns="[{name, path, owner, architecture, params, dtype, where, loading, bytes, kv_bytes, pinned, "
                    "last_used_s_ago, processes, adapters}]"),
    Syscall(22, "free", cap="mm", doc="Device and host memory budgets split into weights, KV, reserve and free.",
            returns="{device:{budget, weights, kv, adapters, reserve, free}, host:{budget, weights, adapters, free}}"),
    Syscall(23, "svc_list", doc="Services: state, pid, restarts, calls served, the calls each serves "
                                "(with their schemas under 'schemas').",
            returns="[{name, pid, state, restarts, calls_served, calls, uptime_s, schemas}]"),
    Syscall(24, "svc_start", (Arg("name", "str", required=True, max_len=64),), cap="admin",
            doc="Start a built-in service or a plug-in from the llmos.services entry-point group.",
            returns="{name, pid, state}"),
    Syscall(25, "svc_stop", (Arg("name", "str", required=True, max_len=64),), cap="admin",
            doc="Stop a service (no restart); its calls answer EAGAIN.", returns="true"),
    Syscall(26, "svc_register", (Arg("name", "str", required=True, max_len=64),
                                 Arg("calls", "list", required=True, max_len=256,
                                     items=Arg("call", "map", required=True, fields=(
                                         Arg("name", "str", required=True, min_len=1, max_len=64),))),
                                 Arg("pid", "int", min=0)), cap=SERVICE_CAP,
            doc="(services only) Declare the calls this service serves: [{name, cap, stream, doc, returns, "
                "args:[{name, type, required, default, min, max, max_len, choices, doc}]}].",
            returns="{registered}"),
    Syscall(27, "svc_heartbeat", (Arg("name", "str", max_len=64),), cap=SERVICE_CAP,
            doc="(services only) I am alive; send at least every few seconds.", returns="true"),
    Syscall(28, "svc_reply", (Arg("id", "int", required=True, min=0), Arg("ok", "bool", required=True),
                              Arg("more", "bool", default=False), Arg("result", "any"), Arg("error", "map")),
            cap=SERVICE_CAP,
            doc="(services only) One frame of the answer to a forwarded call; one-way: the kernel does not reply.",
            returns="nothing"),
    Syscall(29, "svc_call", (Arg("call", "str", required=True, max_len=64),
                             Arg("args", "map", max_len=256), Arg("uid", "int", required=True, min=0)),
            doc="(services, and root: a cluster kernel's upstream) Make a service's call on behalf of user uid "
                "(e.g. the tuner reading a dataset from fs): checked against that user's capabilities; streamed "
                "calls stream.",
            returns="the call's own reply"),
    Syscall(30, "mm_lease", (Arg("bytes", "int", required=True, min=1, max=1 << 50),
                             Arg("priority", "int", default=0, min=-20, max=19,
                                 doc="nice value: inference at this priority or more important may revoke it"),
                             Arg("purpose", "str", default="", max_len=256)),
            cap=SERVICE_CAP,
            doc="(services only) Lease device memory outside models and KV (e.g. for training). Idle models "
                "are evicted to make room; EAGAIN if it cannot be had now, ENOMEM if it can never fit. "
                "A lease may be revoked for inference: poll mm_leases, then release it.",
            returns="{lease, bytes, priority, state}"),
    Syscall(31, "mm_release", (Arg("lease", "int", required=True, min=1),), cap=SERVICE_CAP,
            doc="(services only) Give a lease back.", returns="true"),
    Syscall(32, "mm_leases", doc="Memory leases: holder, bytes, priority, state (held | revoked).",
            returns="[{lease, holder, bytes, priority, state, purpose, age_s}]"),
    Syscall(33, "feedback", (_pid(), Arg("rating", "int", required=True, min=-1, max=1,
                                         doc="1 good, 0 neutral, -1 bad"),
                             Arg("correction", "str", max_len=_TEXT, doc="what the answer should have been")),
            cap="proc",
            doc="Record a process's prompt and latest output (and the correction) in your feedback dataset "
                f"({FEEDBACK_PATH} in your file store); tune_submit(dataset='feedback') trains on it.",
            returns="{path, records}"),
    Syscall(34, "alerts", (Arg("since", "int", min=0, doc="also return the events after this sequence number"),
                           Arg("wait", "float", default=0.0, min=0.0, max=3600.0,
                               doc="seconds to wait for an event after since (a subscription, by long poll)")),
            blocking=True,
            doc="Firing alerts (KV usage, queue wait, swap rate, services down) and alert events; with since "
                "and wait, replies when the next event comes.",
            returns="{active:[{name, severity, value, threshold, since, message}], events:[{seq, t, name, state, "
                    "...}], seq, thresholds}"),
    Syscall(35, "alert_set", (Arg("name", "str", required=True, max_len=64),
                              Arg("threshold", "float", required=True, min=0.0, doc="0 turns it off")),
            cap="admin", doc="Change an alert's threshold.", returns="{thresholds}"),
    Syscall(36, "user_set", (Arg("name", "str", required=True, max_len=64),
                             Arg("share", "float", min=1e-3, max=1e6,
                                 doc="fair-share weight (default 1): within a priority level users are served "
                                     "tokens in proportion to their shares")),
            cap="admin", doc="Change a user's settings (saved with the users).", returns="{user, uid, share}"),
    Syscall(37, "shares", (Arg("all", "bool", default=False, doc="root: every user with processes or a share"),),
            cap="proc", doc="Your share of the device and what you hold: fair-share weight and fraction (among "
                            "users with live processes), tokens served, live processes and KV blocks (a block your "
                            "processes share counts once) against your quotas.",
            returns="[{user, uid, share, fraction, tokens_served, procs, max_procs, kv_blocks, kv_quota}]"),
    Syscall(38, "checkpoint", (_pid(), Arg("path", "str", max_len=4096,
                                           doc="write the image (msgpack) to this path in your file store "
                                               "instead of returning it")), cap="proc",
            doc="A self-contained image of a live process: its record (sampling seed, parameters, state, turn), "
                "every token, and the model (and LoRA adapter) it needs, named and hashed (config and weight "
                "files). restore makes a new process from it, here or on another kernel; its KV is recomputed, "
                "not carried.",
            returns="{format, pid, model:{name, hash}, adapter:{name, hash}|null, process:{...}, token_ids}, "
                    "or {pid, path, size, sha256} with path"),
    Syscall(39, "restore", (Arg("image", "map", max_len=64, doc="what checkpoint returned"),
                            Arg("path", "str", max_len=4096, doc="instead: an image checkpoint wrote to your file "
                                                                 "store"),
                            Arg("owner", "int", min=0, doc="with path: whose file store (a uid that shared it "
                                                           "with you); default: yours"),
                            Arg("adapter", "str", max_len=4096,
                                doc="the adapter to use, where the image has one (default: the image's name "
                                    "for it, e.g. adapters/x in your file store); it must hash the same"),
                            Arg("uid", "int", min=0, doc="root only (a cluster's front migrating a process): "
                                                         "the new process is this user's, in the image's session")),
            cap="proc", journaled=True,
            doc="A new process of yours from a checkpoint image, in the state it was checkpointed in (STOPPED "
                "stays STOPPED); it continues exactly as the original would have. EINVAL names what is wrong: "
                "not an image, a malformed field, or a model or adapter that differs here (its hash).",
            returns="pid"),
    Syscall(40, "bye", doc="End this session cleanly (the envelope's session): its processes are not sent HUP.",
            returns="true if the session was known"),
    Syscall(41, "user_key", (Arg("name", "str", required=True, max_len=64),
                             Arg("key", "str", required=True, max_len=64, doc="a CURVE public key (40 Z85 characters)"),
                             Arg("remove", "bool", default=False, doc="drop the key instead of adding it")),
            cap="admin", doc="Register a client public key for a user: once it has one, only connections made "
                             "with a registered key may speak for it over CURVE (its tokens alone no longer "
                             "suffice). Local (ipc) connections are not affected.",
            returns="{user, keys}"),
    Syscall(43, "svc_attach", (Arg("name", "str", required=True, max_len=64),), cap="admin",
            doc="A plug-in whose host runs elsewhere (e.g. another machine, over CURVE): returns the one-time "
                "service token its host registers with (LLMOS_SERVICE_TOKEN). It is supervised by its "
                "heartbeats, never started or restarted here; once down it must be attached anew.",
            returns="{name, token}"),
    Syscall(42, "audit", (Arg("since", "float", min=0.0, doc="Unix seconds: only events from then on"),
                          Arg("user", "str", max_len=64, doc="only events about this user"),
                          Arg("event", "str", max_len=32, doc="only this kind of event"),
                          Arg("limit", "int", default=1000, min=1, max=100_000)),
            cap="admin", doc="The audit trail: security-relevant events, newest last (docs/abi.md, Audit).",
            returns="[{time, event, user, ...}]"),
    Syscall(44, "users_sync", (Arg("table", "map", max_len=4, doc="a table users_sync returned: replace "
                                                                   "this kernel's with it"),
                               Arg("upstream", "map", max_len=4, doc="{endpoint, server_key, token}: the head "
                                   "kernel whose services this one uses for its own service calls (as svc_call)")),
            cap="admin", doc="(root; a cluster's front) The user table with token hashes (never tokens), or, "
                             "with table, replace this kernel's with it: how every kernel of a cluster shares "
                             "the head's users.",
            returns="{next_uid, users:{name:{uid, caps, token_hashes, share, keys}}}"),
    Syscall(45, "cluster", served_by=CLUSTER, doc="(a cluster's front) Nodes, kernels (state, node, model, load, "
                                                  "processes) and placement counters; a kernel answers ENOTSUP.",
            returns="{nodes:[{node, address, alive, resources}], kernels:[{kernel, node, state, boot_id, "
                    "models, procs, load, restarts}], placement:{...}}"),
    Syscall(46, "cluster_drain", (Arg("kernel", "int", min=0, doc="the kernel to drain"),
                                  Arg("node", "str", max_len=128, doc="instead: every kernel on this node "
                                                                      "(id or address)")),
            cap="admin", served_by=CLUSTER, blocking=True,
            doc="Move the kernel's live processes to the others by checkpoint/restore (each continues "
                "exactly; its pid stays), keep its ended ones' results at the front, then stop it.",
            returns="{kernels:[id], moved:[pid], failed:[{pid, error}]}"),
    Syscall(47, "cluster_add", (Arg("n", "int", default=1, min=1, max=64, doc="kernels to start"),),
            cap="admin", served_by=CLUSTER, blocking=True,
            doc="Start n more kernels (Ray places them where resources are free) with the cluster's options.",
            returns="{kernels:[id]}"),
)

BY_NAME: dict[str, Syscall] = {s.name: s for s in SYSCALLS}
BY_NUM: dict[int, Syscall] = {s.num: s for s in SYSCALLS}
assert len(BY_NAME) == len(BY_NUM) == len(SYSCALLS), "syscall names and numbers must be unique"


def lookup(call: str | int) -> Syscall:
    """The syscall for a wire name or number; ``ENOSYS`` if there is none."""
    sc = BY_NUM.get(call) if isinstance(call, int) else BY_NAME.get(call)
    if sc is None:
        raise SyscallError("ENOSYS", f"unknown syscall {call!r}")
    return sc


def check_args(sc: Syscall, args: dict) -> dict:
    """Validate ``args`` against the schema; returns them with defaults filled in."""
    unknown = [k for k in args if k not in sc.arg_by_name]
    if unknown:
        raise SyscallError("EINVAL", f"{sc.name}: unknown argument(s) {sorted(unknown)}")
    return {a.name: a.check(args.get(a.name)) for a in sc.args}
