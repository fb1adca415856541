"""File-store and knowledge-graph commands: ls, cat, put, get, rm (fs_*) and kg (kg_*)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from llmos.userland import render
from llmos.userland.sh_base import UsageError, arg, command, subcommands

PUT_WHOLE = 4 << 20          # files up to this size go in one fs_put; bigger ones in chunks
CHUNK = 1 << 20
_OWNER = arg("--owner", type=int, help="read from this uid's namespace (shared with you)")


@command("ls", "List your files (under a prefix).", arg("prefix", nargs="?", default=""), _OWNER)
def ls(ctx, a):
    rows = ctx.call("fs_list", prefix=a.prefix, owner=a.owner)
    ctx.out(rows, render.files_view(rows))


@command("cat", "Print a file from the file store.", arg("path"), _OWNER, json=False)
def cat(ctx, a):
    out = ctx.console.file
    binary = getattr(out, "buffer", None) if not out.isatty() else None
    ends_nl = True
    for chunk in ctx.client.stream("fs_read", path=a.path, **({"owner": a.owner} if a.owner is not None else {})):
        if not chunk:
            continue
        if binary is not None:
            binary.write(chunk)
        else:
            out.write(render.printable(chunk.decode("utf-8", errors="replace")))
        ends_nl = chunk.endswith(b"\n")
    if binary is not None:
        binary.flush()
    elif not ends_nl:
        out.write("\n")
    out.flush()


@command("put", "Upload a local file (big files go in chunks).", arg("local"),
         arg("path", nargs="?", help="path in the store (default: the file's name)"),
         arg("--no-overwrite", action="store_true"))
def put(ctx, a):
    src = Path(a.local).expanduser()
    dest = a.path or src.name
    size = src.stat().st_size
    overwrite = not a.no_overwrite
    if size <= PUT_WHOLE:
        r = ctx.call("fs_put", path=dest, data=src.read_bytes(), overwrite=overwrite)
    else:
        handle = ctx.call("fs_write_open", path=dest, overwrite=overwrite)["handle"]
        try:
            with open(src, "rb") as f:             # 4 chunks in flight: 2.5x one at a time
                chunks = ({"handle": handle, "data": c} for c in iter(lambda: f.read(CHUNK), b""))
                for _ in ctx.client.pipeline("fs_write", chunks, window=4):
                    pass
            r = ctx.call("fs_write_commit", handle=handle)
        except BaseException:
            try:
                ctx.client.call("fs_write_abort", handle=handle)
            except Exception:
                pass
            raise
    ctx.out(r, f"{r['path']}: {render.human_bytes(r['size'])} sha256 {r['sha256'][:12]}")


@command("get", "Download a file from the store to a local path ('-' for stdout).", arg("path"),
         arg("local", nargs="?", help="local file (default: the file's name)"), _OWNER)
def get(ctx, a):
    local = a.local or Path(a.path).name
    extra = {"owner": a.owner} if a.owner is not None else {}
    if local == "-":
        for chunk in ctx.client.stream("fs_read", path=a.path, **extra):
            sys.stdout.buffer.write(chunk or b"")
        sys.stdout.buffer.flush()
        return
    dest = Path(local).expanduser()
    tmp = dest.with_name(f".{dest.name}.part")
    size = 0
    try:
        with open(tmp, "wb") as f:
            for chunk in ctx.client.stream("fs_read", path=a.path, **extra):
                f.write(chunk or b"")
                size += len(chunk or b"")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    ctx.out({"path": str(dest), "size": size}, f"{dest}: {render.human_bytes(size)}")


@command("rm", "Remove files from the store.", arg("paths", nargs="+", metavar="PATH"))
def rm(ctx, a):
    for p in a.paths:
        ctx.call("fs_rm", path=p)
    ctx.out({"removed": a.paths}, f"removed {' '.join(a.paths)}")


# -- knowledge graph ------------------------------------------------------------------------------
_GRAPH = arg("-g", "--graph", help="mine (default) | shared | user:<uid>")


def _kg(p):
    subcommands(
        p,
        ("add", "Add a fact: SUBJECT RELATION OBJECT (quote words with spaces).",
         [arg("triple", nargs=3, metavar=("SUBJECT", "RELATION", "OBJECT")), _GRAPH, arg("--source")]),
        ("query", "Match a pattern; terms starting with ? are variables: kg query ?who works_at Acme",
         [arg("triple", nargs=3, metavar=("S", "R", "O")), _GRAPH, arg("--limit", type=int)]),
        ("path", "The facts along a shortest path between two entities.", [arg("a"), arg("b"), _GRAPH]),
        ("search", "Find entities by name (substring, fuzzy).",
         [arg("text", nargs="+"), _GRAPH, arg("--limit", type=int)]),
        ("neighbors", "Entities and facts around one entity.",
         [arg("entity"), _GRAPH, arg("--depth", type=int), arg("--relation")]),
        ("rm", "Remove a fact (3 words) or an entity (1 word) with its facts.",
         [arg("target", nargs="+"), _GRAPH]),
    )


@command("kg", "The knowledge graph: kg add|query|path|search|neighbors|rm.", build=_kg,
         words=("add", "query", "path", "search", "neighbors", "rm"))
def kg(ctx, a):
    g = a.graph
    if a.sub == "add":
        r = ctx.call("kg_add", triples=[list(a.triple)], graph=g, source=a.source)
        ctx.out(r, f"added {r['added']}")
    elif a.sub == "query":
        rows = ctx.call("kg_query", pattern=list(a.triple), graph=g, limit=a.limit)
        ctx.out(rows)
    elif a.sub == "path":
        rows = ctx.call("kg_path", a=a.a, b=a.b, graph=g)
        ctx.out(rows, render.Text("\n".join(" -- ".join(map(str, _triple(t))) for t in rows) or "no path"))
    elif a.sub == "search":
        rows = ctx.call("kg_search", text=" ".join(a.text), graph=g, limit=a.limit)
        ctx.out(rows)
    elif a.sub == "neighbors":
        r = ctx.call("kg_neighbors", entity=a.entity, graph=g, depth=a.depth, relation=a.relation)
        ctx.out(r, render.Text("\n".join(" -- ".join(map(str, _triple(t))) for t in r.get("edges", []))
                               or "no neighbours"))
    elif a.sub == "rm":
        if len(a.target) not in (1, 3):
            raise UsageError("give an entity (1 word) or a fact (3 words)")
        r = ctx.call("kg_rm", target=a.target[0] if len(a.target) == 1 else list(a.target), graph=g)
        ctx.out(r, f"removed {r['removed']}")


def _triple(t):
    if isinstance(t, dict):
        return [t.get("s"), t.get("r"), t.get("o")]
    return list(t)[:3]
