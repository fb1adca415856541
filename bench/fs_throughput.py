"""File-store throughput: put and get of one large file through the ABI vs a plain file copy.

    python bench/fs_throughput.py [--size 1GiB] [--chunk 4MiB] [--repeat 3]

One source file of random bytes is written to the temp directory once. llmos put: the client
reads it in ``--chunk`` pieces from disk and uploads them with ``fs_write_open`` / ``fs_write``
/ ``fs_write_commit`` (the fs service hashes, writes and fsyncs it); the time is from open to
the commit's reply. llmos get: the streamed ``fs_read`` (1 MiB frames), hashed incrementally
on the client and never held whole; the sha256 is checked against the source's. Plain copy:
``shutil.copyfile`` of the same source to a new file on the same disk, plus an ``fsync`` of
the copy (fs fsyncs too). For reference, the same put and get straight on a ``FileStore`` in
the benchmark's process (no kernel, no service) show what the ABI costs. The file is removed from the store after each repeat, so every put
stores new content. Both sides read a source that is in the page cache. MB/s = 10^6 bytes/s;
medians of ``--repeat`` runs, the sides alternating run by run.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time

import _common as bc

MiB = 1 << 20


def size_arg(text: str) -> int:
    t = text.strip().lower()
    for suffix, mult in (("gib", 1 << 30), ("mib", MiB), ("kib", 1 << 10), ("g", 1 << 30),
                         ("m", MiB), ("k", 1 << 10), ("", 1)):
        if t.endswith(suffix):
            return int(float(t[: len(t) - len(suffix)] if suffix else t) * mult)
    raise argparse.ArgumentTypeError(text)


def make_source(path: str, size: int) -> str:
    """``size`` random bytes at ``path``, written in 64 MiB pieces; returns their sha256."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 64 * MiB))
            h.update(block)
            f.write(block)
            left -= len(block)
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()


def plain_copy(src: str, dst: str) -> float:
    t0 = time.perf_counter()
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    wall = time.perf_counter() - t0
    os.unlink(dst)
    return wall


def llmos_put(c, src: str, path: str, chunk: int, sha: str, window: int = 1) -> float:
    """An upload with ``window`` fs_writes in flight (1: each waits for the one before)."""
    t0 = time.perf_counter()
    handle = c.call("fs_write_open", path=path)["handle"]
    with open(src, "rb", buffering=0) as f:
        chunks = ({"handle": handle, "data": block} for block in iter(lambda: f.read(chunk), b""))
        for _ in c.pipeline("fs_write", chunks, window=window):
            pass
    st = c.call("fs_write_commit", handle=handle, _timeout=600)
    wall = time.perf_counter() - t0
    assert st["sha256"] == sha, "stored content differs from the source"
    return wall


def llmos_get(c, path: str, size: int, sha: str) -> tuple[float, float]:
    """Seconds for the streamed download, and of those the client's hashing."""
    h = hashlib.sha256()
    n = 0
    hashing = 0.0
    t0 = time.perf_counter()
    for frame in c.stream("fs_read", path=path, _timeout=600):
        if frame is None:
            break
        t1 = time.perf_counter()
        h.update(frame)
        hashing += time.perf_counter() - t1
        n += len(frame)
    wall = time.perf_counter() - t0
    assert n == size and h.hexdigest() == sha, "downloaded content differs from the source"
    return wall, hashing


def store_put(store, src: str, chunk: int, sha: str) -> float:
    """The same upload straight into a ``FileStore`` in this process (no ABI)."""
    t0 = time.perf_counter()
    w = store.open_write(0, "bench/big")
    with open(src, "rb", buffering=0) as f:
        while block := f.read(chunk):
            w.write(block)
    st = w.commit()
    wall = time.perf_counter() - t0
    assert st["sha256"] == sha
    return wall


def store_get(store, size: int, sha: str) -> float:
    h = hashlib.sha256()
    t0 = time.perf_counter()
    for block in store.iter_read(0, "bench/big", 1 << 20):
        h.update(block)
    wall = time.perf_counter() - t0
    assert h.hexdigest() == sha
    store.rm(0, "bench/big")
    return wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=size_arg, default=1 << 30, help="file size (e.g. 1GiB, 256MiB; default 1GiB)")
    ap.add_argument("--chunk", type=size_arg, default=4 * MiB, help="fs_write chunk (default 4MiB)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--window", type=int, default=4, help="fs_writes in flight for the pipelined put")
    ap.add_argument("--dir", default=tempfile.gettempdir(),
                    help="where the source, the plain copy and the kernel's state go (one disk)")
    a = ap.parse_args()

    # The store's quota must hold the file (and the upload's temp) with room to spare.
    os.environ["LLMOS_FS_QUOTA"] = str(max(4 * a.size, 1 << 30))
    os.environ["TMPDIR"] = a.dir          # KernelProc's state directory goes here too
    tempfile.tempdir = None
    work = tempfile.mkdtemp(prefix="llmos-fsbench-", dir=a.dir)
    src, dst = os.path.join(work, "source"), os.path.join(work, "copy")
    k = None
    put, pput, get, hashing, copy, sput, sget = [], [], [], [], [], [], []
    try:
        t0 = time.perf_counter()
        sha = make_source(src, a.size)
        gen = time.perf_counter() - t0
        from pathlib import Path
        from llmos.services.fs.store import FileStore
        store = FileStore(Path(work) / "store", default_quota_bytes=4 * a.size)
        k = bc.start_service_kernel("fs")
        with k.client(timeout=120) as c:
            # Warm-up: a small round trip on each side (imports, first blob directories).
            small = os.path.join(work, "small")
            with open(small, "wb") as f:
                f.write(os.urandom(8 * MiB))
            wsha = hashlib.sha256(open(small, "rb").read()).hexdigest()
            llmos_put(c, small, "bench/warm", a.chunk, wsha)
            llmos_get(c, "bench/warm", 8 * MiB, wsha)
            c.call("fs_rm", path="bench/warm")
            plain_copy(small, dst)
            os.unlink(small)
            for r in range(a.repeat):
                copy.append(plain_copy(src, dst))
                put.append(llmos_put(c, src, "bench/big", a.chunk, sha))
                c.call("fs_rm", path="bench/big")
                pput.append(llmos_put(c, src, "bench/big", a.chunk, sha, window=a.window))
                g, hs = llmos_get(c, "bench/big", a.size, sha)
                get.append(g)
                hashing.append(hs)
                c.call("fs_rm", path="bench/big")
                sput.append(store_put(store, src, a.chunk, sha))
                sget.append(store_get(store, a.size, sha))
    finally:
        if k is not None:
            k.cleanup()
        shutil.rmtree(work, ignore_errors=True)

    mb = a.size / 1e6
    put_r, pput_r, get_r, copy_r, sput_r, sget_r = ([mb / t for t in xs] for xs in (put, pput, get, copy, sput, sget))
    p_med, g_med, c_med = bc.med(put_r), bc.med(get_r), bc.med(copy_r)
    fmt = lambda xs: ", ".join(f"{x:.0f}" for x in xs)
    print(f"fs throughput: one {a.size / MiB:.0f} MiB file of random bytes; fs_write chunks of "
          f"{a.chunk / MiB:g} MiB, fs_read frames of 1 MiB; disk of {a.dir}; {os.cpu_count()} cores; "
          f"median of {a.repeat} (source written in {gen:.1f} s)")
    print(f"  llmos put (fs_write_open/fs_write/fs_write_commit) {p_med:8.0f} MB/s   runs: {fmt(put_r)}")
    print(f"  llmos put, {a.window} fs_writes in flight (pipeline)   {bc.med(pput_r):8.0f} MB/s   runs: {fmt(pput_r)}")
    print(f"  llmos get (streamed fs_read, sha256 on the client)  {g_med:8.0f} MB/s   runs: {fmt(get_r)}"
          f"   (client hashing: median {bc.med(hashing):.2f} s of {bc.med(get):.2f} s)")
    print(f"  plain copy (shutil.copyfile + fsync)               {c_med:8.0f} MB/s   runs: {fmt(copy_r)}")
    print(f"  for reference, FileStore in this process (no ABI): put {bc.med(sput_r):.0f} MB/s "
          f"(runs: {fmt(sput_r)}), get+sha256 {bc.med(sget_r):.0f} MB/s (runs: {fmt(sget_r)})")
    print(f"  ratio put / plain copy   {p_med / c_med:6.2f}x   (median of per-run ratios "
          f"{bc.med([p / q for p, q in zip(put_r, copy_r)]):.2f}x)")
    print(f"  ratio pipelined put / plain copy {bc.med(pput_r) / c_med:6.2f}x   (pipelined / one at a time "
          f"{bc.med([p / q for p, q in zip(pput_r, put_r)]):.2f}x, median of per-run ratios)")
    print(f"  ratio get / plain copy   {g_med / c_med:6.2f}x   (median of per-run ratios "
          f"{bc.med([p / q for p, q in zip(get_r, copy_r)]):.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
