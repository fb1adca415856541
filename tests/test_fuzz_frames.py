"""Property test: 10,000+ random and mutated frames never hurt the kernel."""
import random

import msgpack
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmos.syscalls.table import SYSCALLS

FRAMES_PER_EXAMPLE = 50
EXAMPLES = 22
MUTANTS = 9             # each drawn frame is also sent 9 times, randomly mutated: 11,000 frames

values = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=20)
                      | st.binary(max_size=20), lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                      max_leaves=8)
near_valid = st.fixed_dictionaries({
    "v": st.just(1), "id": st.integers(0, 2**64 - 1), "call": st.sampled_from([s.name for s in SYSCALLS]),
    "args": st.dictionaries(st.sampled_from(["pid", "sig", "value", "prompt"]), values, max_size=3),
    "token": st.text(max_size=12)})
wild = st.fixed_dictionaries({}, optional={
    "v": st.sampled_from([1, 1, 1, 0, 2, "1", None]), "id": st.integers(-5, 2**64 - 1) | st.text(max_size=70) | values,
    "call": st.sampled_from([s.name for s in SYSCALLS] + [s.num for s in SYSCALLS]) | values,
    "args": st.dictionaries(st.sampled_from(["pid", "sig", "value", "prompt", "max_tokens", "n", "x"]), values, max_size=4) | values,
    "token": st.text(max_size=10) | values, "junk": values})
envelopes = near_valid | wild


def mutate(frame: bytes, rng: random.Random) -> bytes:
    """Flip a few bytes, then maybe truncate or extend: the frames a buggy client would send."""
    b = bytearray(frame)
    for _ in range(rng.randint(1, 4)):
        if b:
            b[rng.randrange(len(b))] = rng.randrange(256)
    cut = rng.random()
    if cut < 0.3:
        b = b[:rng.randint(0, len(b))]
    elif cut < 0.4:
        b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return bytes(b)


def test_random_and_mutated_frames_then_a_valid_call_succeeds(kernel, root):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(kernel.socket)
    sent = [0]

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def blast(data):
        for _ in range(FRAMES_PER_EXAMPLE):
            if data.draw(st.integers(0, 3)) == 0:
                frame = data.draw(st.binary(max_size=64))
            else:
                frame = msgpack.packb(data.draw(envelopes), use_bin_type=True)
            rng = random.Random(frame)
            for f in [frame] + [mutate(frame, rng) for _ in range(MUTANTS)]:
                sock.send(f)
                sent[0] += 1
    blast()
    assert sent[0] >= 10_000
    assert root.nop()["boot_id"]          # after the storm, a valid call succeeds
    s = root.stat()
    assert s["requests"] >= sent[0]
    rejected = s["frames_dropped"] + s["errors"]
    assert rejected >= sent[0] * 0.9, s   # almost everything random is refused (and counted)
    assert s["frames_dropped"] > 0 and s["rejects"].get("EPROTO", 0) > 0 and s["rejects"].get("EACCES", 0) > 0
    sock.close()
