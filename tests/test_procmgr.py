"""The process manager alone, without a kernel process or a model: given a process table, a
stand-in model manager and an outbox, signals take one path whether or not a process's model
is on the device, and a model that leaves and comes back takes its processes along."""
from types import SimpleNamespace

from llmos.kernel.loop import Stats
from llmos.kernel.metrics import Metrics
from llmos.kernel.models import Engine, LoadDone, ModelEntry, Where
from llmos.kernel.outbox import Outbox
from llmos.kernel.proc import Process, ProcState, Wait
from llmos.kernel.procio import Waiter, WaitKind
from llmos.kernel.procmgr import ProcManager, Signal
from llmos.kernel.proctable import ProcTable
from llmos.kernel.scheduler import Scheduler
from llmos.syscalls import abi
from sched_factories import make_config, run_step


class Models:
    """The model manager's face the process manager sees: faults, loads, retries."""

    def __init__(self):
        self.entries, self.faults, self.done = {}, [], []

    def fault(self, entry, pin=False, nice=0):
        self.faults.append(entry.name)
        return entry.where is Where.DEVICE

    def poll_loads(self):
        done, self.done = self.done, []
        return done

    def retry_waiting(self, waiting):
        pass

    def engines(self):
        return [e.engine for e in self.entries.values() if e.engine is not None]


def manager():
    models, table, outbox = Models(), ProcTable(), Outbox()
    entry = models.entries["m"] = ModelEntry("m", "m", tokenizer=SimpleNamespace(decode=lambda ids, **kw: ""))
    return ProcManager(SimpleNamespace(), table, models, entry, outbox, Metrics(), Stats()), entry


def spawn(pm, entry, pid, **fields):
    proc = Process(pid=pid, uid=7, model=entry.name, token_ids=[1, 2, 3], **fields)
    pm.start(proc, entry)
    return proc


def frames(pm):
    out = [abi.decode_reply(payload) for _, payload in pm.outbox.frames]
    pm.outbox.frames.clear()
    return out


def test_signals_to_a_process_waiting_for_its_model_take_the_one_path():
    pm, entry = manager()
    proc = spawn(pm, entry, 1, interactive=True)
    assert (proc.state, proc.wait) == (ProcState.BLOCKED, Wait.MODEL) and pm.table.get(1) is proc
    pm.signal(proc, Signal.STOP)
    assert proc.state is ProcState.STOPPED
    pm.signal(proc, Signal.CONT)
    assert (proc.state, proc.wait) == (ProcState.BLOCKED, Wait.MODEL)
    pm.add_waiter(proc, Waiter(WaitKind.READ, SimpleNamespace(identity=b"c", rid=5)))
    pm.signal(proc, Signal.INT)                         # ends the turn it had not started
    [final] = frames(pm)
    assert final["id"] == 5 and final["result"]["finish_reason"] == "interrupted" and not final["more"]
    assert proc.waits_for_input
    pm.write(proc, [4, 5])                              # the next turn faults its model in again
    assert (proc.state, proc.wait) == (ProcState.BLOCKED, Wait.MODEL) and pm.models.faults == ["m", "m"]
    pm.add_waiter(proc, Waiter(WaitKind.WAIT, SimpleNamespace(identity=b"c", rid=6)))
    pm.signal(proc, Signal.KILL)
    [result] = frames(pm)
    assert result["id"] == 6 and result["result"]["finish_reason"] == "killed"
    assert pm.table.get(1) is None                      # reaped by the answered wait


def test_a_model_that_leaves_and_returns_takes_its_processes_in_the_states_they_were_in():
    pm, entry = manager()
    sched = Scheduler(make_config(), table=pm.table.procs)
    entry.where = Where.DEVICE
    entry.engine = Engine("m", SimpleNamespace(adapters=lambda: []), sched, max_model_len=64, kv_bytes=0)
    running, stopped = spawn(pm, entry, 1), spawn(pm, entry, 2)
    chat = spawn(pm, entry, 3, interactive=True, max_tokens=1)
    pm.signal(stopped, Signal.STOP)
    run_step(sched)
    assert chat.waits_for_input and running.state is ProcState.RUNNING and running.block_ids
    assert pm.park(entry, nice=-5)                      # a more important load takes the device
    entry.engine, entry.where = None, Where.HOST
    assert not sched.pids and not running.block_ids
    assert (running.state, running.wait) == (ProcState.BLOCKED, Wait.MODEL)
    assert stopped.state is ProcState.STOPPED and chat.waits_for_input
    pm.signal(stopped, Signal.CONT)                     # holds: it will run once the model is back
    assert (stopped.state, stopped.wait) == (ProcState.BLOCKED, Wait.MODEL)
    back = Scheduler(make_config(), table=pm.table.procs)
    entry.engine, entry.where, entry.loading = Engine("m", None, back, 64, 0), Where.DEVICE, True
    pm.models.done = [LoadDone(entry, None)]
    pm.admit_loaded()
    assert set(back.pids) == {1, 2, 3}
    assert running.state is stopped.state is ProcState.READY and chat.waits_for_input
    assert running.num_preemptions == 1 and running.num_computed_tokens == 0     # recomputed
