"""The ABI without a kernel: envelopes, the table, argument checking, docs/abi.md."""
import msgpack
import pytest

from llmos import SyscallError
from llmos.syscalls import abi, docgen
from llmos.syscalls.client import Client
from llmos.syscalls.table import BY_NAME, SYSCALLS, check_args, lookup


def test_request_round_trips_through_the_envelope():
    req = abi.decode_request(abi.encode_request(7, "uname", {"a": 1}, "tok"))
    assert (req.rid, req.call, req.args, req.token) == (7, "uname", {"a": 1}, "tok")


@pytest.mark.parametrize("frame", [b"\xc1", b"", msgpack.packb([1, 2]), msgpack.packb({"v": 1}),
                                   msgpack.packb({"v": 1, "id": True}), msgpack.packb({"v": 1, "id": "x" * 65})])
def test_frames_without_a_readable_id_are_marked_unanswerable(frame):
    with pytest.raises(SyscallError) as e:
        abi.decode_request(frame)
    assert e.value.errno == "EPROTO" and e.value.rid is None


@pytest.mark.parametrize("env", [
    {"v": 2, "id": 1, "call": "nop"},
    {"v": 1, "id": 1, "call": "nop", "extra": 1},
    {"v": 1, "id": 1, "call": 1.5},
    {"v": 1, "id": 1, "call": "nop", "args": [1]},
    {"v": 1, "id": 1, "call": "nop", "token": 5},
])
def test_bad_envelopes_with_an_id_get_eproto_for_that_id(env):
    with pytest.raises(SyscallError) as e:
        abi.decode_request(msgpack.packb(env))
    assert e.value.errno == "EPROTO" and e.value.rid == 1


def test_table_numbers_and_names_are_unique_and_lookup_takes_both():
    assert len({s.num for s in SYSCALLS}) == len({s.name for s in SYSCALLS}) == len(SYSCALLS)
    assert lookup("uname") is lookup(BY_NAME["uname"].num)
    with pytest.raises(SyscallError) as e:
        lookup("no_such_call")
    assert e.value.errno == "ENOSYS"


@pytest.mark.parametrize("args,errno", [
    ({}, "EINVAL"),                                  # pid required
    ({"pid": "1"}, "EINVAL"),                        # wrong type
    ({"pid": True}, "EINVAL"),                       # bool is not an int
    ({"pid": 0}, "EINVAL"),                          # below bound
    ({"pid": 1, "value": 20}, "EINVAL"),             # above bound
    ({"pid": 1, "value": 0, "bogus": 1}, "EINVAL"),  # unknown argument
])
def test_check_args_refuses_bad_arguments(args, errno):
    with pytest.raises(SyscallError) as e:
        check_args(BY_NAME["nice"], args)
    assert e.value.errno == errno


def test_check_args_fills_defaults_and_enforces_choices_and_lengths():
    assert check_args(BY_NAME["kill"], {"pid": 3})["sig"] == "TERM"
    with pytest.raises(SyscallError):
        check_args(BY_NAME["kill"], {"pid": 3, "sig": "HUP"})
    with pytest.raises(SyscallError) as e:
        check_args(BY_NAME["spawn"], {"stop": ["x"] * 17})
    assert e.value.errno == "E2BIG"
    with pytest.raises(SyscallError):
        check_args(BY_NAME["spawn"], {"temperature": float("nan")})


def test_client_has_a_method_for_every_call():
    for s in SYSCALLS:
        assert callable(getattr(Client, s.name)), s.name
        assert s.doc in getattr(Client, s.name).__doc__


def test_docs_abi_md_agrees_with_the_table():
    from pathlib import Path
    doc = (Path(__file__).parent.parent / "docs" / "abi.md").read_text()
    assert docgen.splice(doc) == doc, "run: python -m llmos.syscalls.docgen"
    for s in SYSCALLS:
        assert f"#### {s.name}" in doc


def test_errors_have_linux_codes():
    err = SyscallError("ESRCH", "gone")
    assert (err.errno, err.code, err.message) == ("ESRCH", 3, "gone")
    assert SyscallError.from_wire(err.to_wire()).errno == "ESRCH"


def test_an_envelope_names_its_session_or_is_refused():
    import msgpack
    req = abi.decode_request(abi.encode_request(3, "nop", {}, "tok", "s1"))
    assert req.session == "s1" and abi.decode_request(abi.encode_request(3, "nop", {}, "tok")).session is None
    for bad in (5, "", "x" * 65, ["a"]):
        frame = msgpack.packb({"v": abi.ABI_VERSION, "id": 9, "call": "nop", "args": {}, "token": None,
                               "session": bad})
        with pytest.raises(SyscallError) as e:
            abi.decode_request(frame)
        assert e.value.errno == "EPROTO" and e.value.rid == 9
