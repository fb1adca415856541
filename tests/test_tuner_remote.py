"""The tuner's file-store client: small files in one call, big ones in pipelined chunks, as the user."""
import pytest

from llmos.services.tuner.remote import PUT_CHUNK, UserFs
from llmos.syscalls.errors import SyscallError


class FakeKernel:
    """Records what a service would send through ``svc_call``; a tiny in-memory fs behind it."""

    def __init__(self, fail_at: int | None = None):
        self.sent, self.files, self.uploads, self.fail_at = [], {}, {}, fail_at

    def call(self, name, **a):
        assert name == "svc_call"
        return self.serve(a["call"], a["args"], a["uid"])

    def pipeline(self, name, seq, window=4):
        assert name == "svc_call" and window > 1
        for a in seq:
            yield self.serve(a["call"], a["args"], a["uid"])

    def serve(self, call, args, uid):
        self.sent.append((call, uid))
        if call == "fs_put":
            self.files[args["path"]] = args["data"]
            return {"size": len(args["data"])}
        if call == "fs_write_open":
            self.uploads["h"] = (args["path"], [])
            return {"handle": "h"}
        if call == "fs_write":
            if self.fail_at is not None and len(self.uploads["h"][1]) == self.fail_at:
                raise SyscallError("EDQUOT", "quota")
            self.uploads["h"][1].append(args["data"])
            return {"size": 0}
        if call == "fs_write_commit":
            path, parts = self.uploads.pop("h")
            self.files[path] = b"".join(parts)
            return {"size": len(self.files[path])}
        if call == "fs_write_abort":
            self.uploads.pop("h")
            return True
        raise AssertionError(call)


def test_small_files_go_whole_and_big_ones_in_chunks_as_the_user():
    k = FakeKernel()
    fs = UserFs(k, uid=1001)
    fs.put("a", b"x" * 10)
    big = bytes(range(256)) * (PUT_CHUNK // 256 * 2 + 3)
    fs.put("b", big)
    assert k.files == {"a": b"x" * 10, "b": big}
    assert {uid for _, uid in k.sent} == {1001}
    assert [c for c, _ in k.sent].count("fs_write") == 3


def test_a_failed_chunk_aborts_the_upload():
    k = FakeKernel(fail_at=1)
    with pytest.raises(SyscallError) as err:
        UserFs(k, uid=7).put("b", b"y" * (PUT_CHUNK * 3))
    assert err.value.errno == "EDQUOT"
    assert "b" not in k.files and k.sent[-1][0] == "fs_write_abort"


def test_steps_left_counts_this_rung_and_the_ones_after():
    from llmos.services.tuner.jobs import steps_left
    from llmos.services.tuner.search import check
    search = check({"space": {"lr": [1e-3, 1e-2]}, "trials": 4, "strategy": "halving", "eta": 2})
    job = {"search": search, "num_train": 8,
           "trials": [{"id": i, "params": {"batch_size": 8, "epochs": 8}, "state": "pending", "steps": 0,
                       "rung": None} for i in range(4)]}
    # 8 steps per trial; rungs: 4 trials to 2 steps, 2 to 4, 1 to 8
    assert steps_left(job, 0) == 4 * 2 + 2 * (4 - 2) + 1 * (8 - 4)
    job["trials"][0].update(state="done", steps=2, rung=0)
    job["trials"][1].update(state="running", steps=1)
    assert steps_left(job, 0) == 1 + 2 + 2 + 4 + 4
