"""The file store's storage engine: blobs, namespaces, shares, quotas, streaming, crash safety."""
import hashlib
import random
import signal
import subprocess
import sys
import threading
import tracemalloc

import pytest

from llmos.services.fs import FileStore, FsError

A, B = 1, 2          # two users


@pytest.fixture
def store(tmp_path):
    with FileStore(tmp_path / "fs") as s:
        yield s


def blob_files(store) -> set[str]:
    return {f.name for f in store.blobs.all_files()}


def errno_of(call, *args, **kwargs) -> str:
    with pytest.raises(FsError) as e:
        call(*args, **kwargs)
    return e.value.errno


# ----- content addressing and reference counts -----
def test_identical_content_is_stored_once_across_files_and_users(store):
    data = b"same bytes" * 1000
    stats = [store.put(A, "a", data), store.put(A, "dir/b", data), store.put(B, "c", data)]
    sha = hashlib.sha256(data).hexdigest()
    assert {s["sha256"] for s in stats} == {sha}
    assert blob_files(store) == {sha}
    assert store.blobs.path(sha).read_bytes() == data
    assert store.index.refs(sha) == 3


def test_blob_is_deleted_with_its_last_reference(store):
    store.put(A, "a", b"x")
    store.put(B, "b", b"x")
    sha = hashlib.sha256(b"x").hexdigest()
    store.rm(A, "a")
    assert blob_files(store) == {sha} and store.get(B, "b") == b"x"
    store.rm(B, "b")
    assert blob_files(store) == set() and store.index.refs(sha) == 0


def test_overwrite_frees_the_old_blob_unless_another_file_names_it(store):
    store.put(A, "keep", b"old")
    store.put(A, "f", b"old")
    store.put(A, "f", b"new")
    assert blob_files(store) == {hashlib.sha256(b).hexdigest() for b in (b"old", b"new")}
    store.put(A, "f", b"newer")
    assert blob_files(store) == {hashlib.sha256(b).hexdigest() for b in (b"old", b"newer")}
    assert store.get(A, "f") == b"newer" and store.fsck() == []


# ----- namespaces and shares -----
def test_users_cannot_read_stat_or_list_each_others_unshared_files(store):
    store.put(A, "secret.txt", b"a's")
    store.put(B, "secret.txt", b"b's")
    assert store.get(B, "secret.txt") == b"b's"           # same name, separate namespaces
    for call in (store.get, store.stat, store.read):
        assert errno_of(call, B, "secret.txt", owner=A) == "EACCES"
    assert errno_of(store.get, B, "no-such-file", owner=A) == "EACCES"   # existence does not leak
    assert errno_of(store.iter_read, B, "secret.txt", owner=A) == "EACCES"
    assert errno_of(store.list, B, owner=A) == "EACCES"
    assert [s["path"] for s in store.list(B)] == ["secret.txt"]


def test_share_grants_read_of_a_prefix_by_whole_components(store):
    store.put(A, "data/qa.jsonl", b"q")
    store.put(A, "data/sub/x", b"x")
    store.put(A, "datasets/other", b"o")
    store.share(A, "data", B)
    assert store.get(B, "data/qa.jsonl", owner=A) == b"q"
    assert b"".join(store.iter_read(B, "data/sub/x", owner=A)) == b"x"
    assert store.stat(B, "data/qa.jsonl", owner=A)["owner"] == A
    assert errno_of(store.get, B, "datasets/other", owner=A) == "EACCES"
    assert errno_of(store.get, B, "data/missing", owner=A) == "ENOENT"
    assert [s["path"] for s in store.list(B, owner=A)] == ["data/qa.jsonl", "data/sub/x"]
    assert [s["path"] for s in store.list(B, "data/sub", owner=A)] == ["data/sub/x"]
    assert errno_of(store.list, B, "datasets", owner=A) == "EACCES"
    assert store.shares(B) == [{"owner": A, "prefix": "data", "reader": B}]
    store.unshare(A, "data", B)
    assert errno_of(store.get, B, "data/qa.jsonl", owner=A) == "EACCES"
    assert errno_of(store.unshare, A, "data", B) == "ENOENT"


def test_sharing_the_whole_namespace_covers_future_files(store):
    store.share(A, "", B)
    store.put(A, "later/file", b"L")
    assert store.get(B, "later/file", owner=A) == b"L"


def test_a_share_grants_read_only(store):
    store.put(A, "data/f", b"mine")
    store.share(A, "data", B)
    assert errno_of(store.put, B, "data/f", b"theirs", owner=A) == "EACCES"
    assert errno_of(store.open_write, B, "data/g", owner=A) == "EACCES"
    assert errno_of(store.rm, B, "data/f", owner=A) == "EACCES"
    assert errno_of(store.mv, B, "data/f", "data/h", owner=A) == "EACCES"
    assert store.get(A, "data/f") == b"mine" and [s["path"] for s in store.list(A)] == ["data/f"]
    assert store.list(B) == []


def test_sharing_with_yourself_is_einval(store):
    assert errno_of(store.share, A, "x", A) == "EINVAL"


# ----- quotas -----
def test_exceeding_the_quota_is_edquot_and_leaves_nothing_behind(store):
    store.set_quota(A, 100)
    store.put(A, "f", b"1" * 60)
    before = (blob_files(store), store.list(A))
    assert errno_of(store.put, A, "g", b"2" * 50) == "EDQUOT"
    w = store.open_write(A, "h")
    w.write(b"3" * 30)
    assert errno_of(w.write, b"3" * 20) == "EDQUOT"
    assert errno_of(w.commit) == "EINVAL"                 # the failed writer is spent
    assert (blob_files(store), store.list(A)) == before
    assert list(store.blobs.tmp_dir.iterdir()) == []
    assert store.usage(A) == {"bytes": 60, "quota": 100}
    store.put(A, "f", b"4" * 100)                         # replacing frees the old size first
    assert store.usage(A)["bytes"] == 100 and store.fsck() == []


def test_shared_content_counts_toward_each_users_quota(store):
    data = b"z" * 1000
    store.put(A, "a", data)
    store.put(B, "b", data)
    store.put(B, "b2", data)
    assert store.usage(A)["bytes"] == 1000 and store.usage(B)["bytes"] == 2000
    assert len(blob_files(store)) == 1


def test_lowering_a_quota_keeps_files_and_still_allows_shrinking(store):
    store.put(A, "f", b"x" * 500)
    store.set_quota(A, 100)
    assert store.get(A, "f") == b"x" * 500
    assert errno_of(store.put, A, "g", b"y") == "EDQUOT"
    store.put(A, "f", b"x" * 400)
    assert store.usage(A) == {"bytes": 400, "quota": 100}


def test_default_quota_applies_to_every_user(tmp_path):
    with FileStore(tmp_path / "fs", default_quota_bytes=10) as store:
        assert store.usage(7) == {"bytes": 0, "quota": 10}
        assert errno_of(store.put, 7, "f", b"x" * 11) == "EDQUOT"


# ----- names, mv, rm, stat, list -----
@pytest.mark.parametrize("path", ["", "/", "/etc/passwd", "/a", ".", "..", "../x", "a/../b", "a/..", "a\x00b", "a\nb", "a\udcff",
                                  "x" * 256, "a/" * 2100, 7, None, b"bytes"])
def test_invalid_paths_are_einval(store, path):
    assert errno_of(store.put, A, path, b"x") == "EINVAL"
    assert errno_of(store.stat, A, path) == "EINVAL"


def test_paths_are_normalised(store):
    store.put(A, "a//b/./c/", b"x")
    assert store.stat(A, "a/b/c")["path"] == "a/b/c"
    assert store.get(A, "./a/b//c") == b"x"


@pytest.mark.parametrize("args", [(-1, "f", b""), (1 << 64, "f", b""), ("1", "f", b""), (True, "f", b""), (A, "f", "text")])
def test_bad_uids_and_data_are_einval(store, args):
    assert errno_of(store.put, *args) == "EINVAL"


def test_file_and_directory_names_cannot_collide(store):
    store.put(A, "a", b"file")
    store.put(A, "d/x", b"in dir")
    assert errno_of(store.put, A, "a/b", b"") == "ENOTDIR"
    assert errno_of(store.put, A, "d", b"") == "EISDIR"
    assert errno_of(store.get, A, "d") == "EISDIR"
    assert errno_of(store.rm, A, "d") == "EISDIR"
    assert errno_of(store.mv, A, "a", "d") == "EISDIR"


def test_put_without_overwrite_refuses_an_existing_file(store):
    store.put(A, "f", b"1")
    assert errno_of(store.put, A, "f", b"2", overwrite=False) == "EEXIST"
    assert store.get(A, "f") == b"1"


def test_mv_renames_without_copying_and_refuses_to_clobber(store):
    s1 = store.put(A, "src", b"payload")
    store.put(A, "dst", b"victim")
    assert errno_of(store.mv, A, "src", "dst") == "EEXIST"
    moved = store.mv(A, "src", "dst", overwrite=True)
    assert moved == {**s1, "path": "dst"}                 # same blob, size and mtime
    assert store.get(A, "dst") == b"payload"
    assert blob_files(store) == {s1["sha256"]}
    assert errno_of(store.stat, A, "src") == "ENOENT"
    assert errno_of(store.mv, A, "src", "x") == "ENOENT"
    store.mv(A, "dst", "new/dir/name")
    assert [s["path"] for s in store.list(A)] == ["new/dir/name"]


def test_rm_and_stat_of_a_missing_file_are_enoent(store):
    assert errno_of(store.rm, A, "nope") == "ENOENT"
    assert errno_of(store.stat, A, "nope") == "ENOENT"


def test_stat_reports_path_size_hash_mtime_owner(store):
    st = store.put(A, "f", b"hello")
    assert st == store.stat(A, "f")
    assert (st["path"], st["size"], st["sha256"], st["owner"]) == ("f", 5, hashlib.sha256(b"hello").hexdigest(), A)
    assert isinstance(st["mtime"], float)


def test_list_is_sorted_and_matches_whole_components(store):
    for p in ["b", "a/2", "a/1", "ab/x", "a/sub/3"]:
        store.put(A, p, p.encode())
    assert [s["path"] for s in store.list(A)] == ["a/1", "a/2", "a/sub/3", "ab/x", "b"]
    assert [s["path"] for s in store.list(A, "a")] == ["a/1", "a/2", "a/sub/3"]
    assert [s["path"] for s in store.list(A, "b")] == ["b"]
    assert store.list(A, "zzz") == []


def test_read_takes_an_offset_and_length(store):
    store.put(A, "f", b"0123456789")
    assert store.read(A, "f", 3, 4) == b"3456"
    assert store.read(A, "f", 8) == b"89"
    assert store.read(A, "f", 20) == b""
    assert errno_of(store.read, A, "f", -1) == "EINVAL"


# ----- streaming writes and reads -----
def test_writer_publishes_nothing_until_commit_and_abort_keeps_the_old_version(store):
    store.put(A, "f", b"old")
    w = store.open_write(A, "f")
    w.write(b"new ")
    w.write(b"content")
    assert store.get(A, "f") == b"old"
    w.abort()
    assert store.get(A, "f") == b"old" and list(store.blobs.tmp_dir.iterdir()) == []
    with store.open_write(A, "f") as w:
        w.write(b"committed")
    assert store.get(A, "f") == b"committed"
    with pytest.raises(RuntimeError), store.open_write(A, "f") as w:
        w.write(b"lost")
        raise RuntimeError
    assert store.get(A, "f") == b"committed"


def test_an_open_reader_keeps_its_version_while_the_file_is_replaced(store):
    store.put(A, "f", b"a" * 10)
    chunks = store.iter_read(A, "f", chunk=4)
    first = next(chunks)
    store.put(A, "f", b"b" * 10)                         # frees and unlinks the old blob
    assert first + b"".join(chunks) == b"a" * 10
    assert store.get(A, "f") == b"b" * 10


def test_streaming_64_mib_in_1_mib_chunks_uses_little_memory_both_ways(store):
    num_chunks, chunk = 64, 1 << 20
    block = random.Random(0).randbytes(chunk)
    expected = hashlib.sha256()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        w = store.open_write(A, "big.bin")
        for i in range(num_chunks):
            piece = i.to_bytes(8, "little") + block[8:]
            expected.update(piece)
            w.write(piece)
            del piece
        st = w.commit()
        write_peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.reset_peak()
        got, num_bytes = hashlib.sha256(), 0
        for part in store.iter_read(A, "big.bin"):
            got.update(part)
            num_bytes += len(part)
        read_peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert st["size"] == num_bytes == num_chunks * chunk
    assert st["sha256"] == got.hexdigest() == expected.hexdigest()
    assert write_peak < 8 * chunk and read_peak < 8 * chunk, (write_peak, read_peak)


def test_concurrent_writers_and_readers_keep_the_index_consistent(store):
    contents = [bytes([i]) * (1000 + i) for i in range(4)]
    errors = []

    def work(i):
        try:
            for n in range(25):
                store.put(A, f"own/{i}/{n % 5}", contents[(i + n) % 4])
                store.put(A, "shared", contents[i])
                assert store.get(A, "shared") in contents
        except Exception as e:           # surfaced below; a thread cannot fail the test itself
            errors.append(e)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and store.fsck() == []
    assert blob_files(store) == {hashlib.sha256(c).hexdigest() for c in contents}
    assert len(store.list(A)) == 21


# ----- opening, gc, fsck -----
def test_a_store_root_is_open_in_one_process_at_a_time_and_survives_reopening(tmp_path):
    with FileStore(tmp_path / "fs") as s:
        s.put(A, "f", b"durable")
        s.share(A, "f", B)
        s.set_quota(A, 12345)
        assert errno_of(FileStore, tmp_path / "fs") == "EBUSY"
    with FileStore(tmp_path / "fs") as s:
        assert s.get(B, "f", owner=A) == b"durable" and s.usage(A)["quota"] == 12345


def test_open_collects_orphan_blobs_and_temp_debris(tmp_path):
    with FileStore(tmp_path / "fs") as s:
        s.put(A, "f", b"kept")
        orphan = s.blobs.path(hashlib.sha256(b"orphan").hexdigest())
        orphan.parent.mkdir(exist_ok=True)
        orphan.write_bytes(b"orphan")
        (s.blobs.tmp_dir / "w-crashed").write_bytes(b"half a write")
        live = s.open_write(A, "g")
        live.write(b"in progress")
        assert s.gc() == {"tmp_files": 1, "orphan_blobs": 1, "orphan_bytes": 6}
        live.commit()                                   # gc spared the open writer's temp file
    with FileStore(tmp_path / "fs") as s:
        assert (s.get(A, "f"), s.get(A, "g")) == (b"kept", b"in progress")
        assert blob_files(s) == {hashlib.sha256(b).hexdigest() for b in (b"kept", b"in progress")}


def test_fsck_reports_missing_and_corrupt_blobs(store):
    store.put(A, "gone", b"1")
    store.put(A, "bad", b"2")
    store.blobs.path(hashlib.sha256(b"1").hexdigest()).unlink()
    store.blobs.path(hashlib.sha256(b"2").hexdigest()).write_bytes(b"3")
    problems = store.fsck()
    assert len(problems) == 2 and "missing" in problems[0] + problems[1] and "hash" in problems[0] + problems[1]


# ----- crash safety -----
CHILD = r"""
import random, sys
from llmos.services.fs import FileStore
root, seq = sys.argv[1], int(sys.argv[2])
A = random.Random(1).randbytes(4 << 20)
B = random.Random(2).randbytes(4 << 20)
store = FileStore(root)
if seq == 0:
    store.put(1, "pinned", A)          # keeps blob A referenced while "f" flips between A and B
while True:
    seq += 1
    data = A if seq % 2 else B
    if seq % 3:
        store.put(1, "f", data)
    else:
        with store.open_write(1, "f") as w:
            for i in range(0, len(data), 1 << 18):
                w.write(data[i:i + (1 << 18)])
    store.put(1, "seq", str(seq).encode())
    print(seq, flush=True)             # acknowledged: must survive the kill
"""


def test_sigkill_at_random_moments_never_tears_a_file_or_loses_an_acknowledged_write(tmp_path):
    contents = (random.Random(1).randbytes(4 << 20), random.Random(2).randbytes(4 << 20))
    root, rng, seq, debris = tmp_path / "fs", random.Random(1234), 0, 0
    for _ in range(24):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(seq)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        first = child.stdout.readline()
        assert first, child.stderr.read().decode()
        # Kill somewhere in the next few write cycles.
        try:
            child.wait(timeout=rng.uniform(0.0, 0.12))
        except subprocess.TimeoutExpired:
            pass
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert child.returncode == -signal.SIGKILL
        acked = int((first + child.stdout.read()).split()[-1])
        child.stdout.close()
        child.stderr.close()
        with FileStore(root) as store:
            debris += store.gc_at_open["tmp_files"] + store.gc_at_open["orphan_blobs"]
            assert store.get(1, "f") in contents
            assert store.get(1, "pinned") == contents[0]
            seq = int(store.get(1, "seq"))
            assert acked <= seq <= acked + 1
            assert store.fsck(verify_hashes=True) == []
            assert blob_files(store) == set(store.index.blob_refs())
            assert list(store.blobs.tmp_dir.iterdir()) == []
    assert debris > 0, "no kill landed inside a write; the test proved nothing"
