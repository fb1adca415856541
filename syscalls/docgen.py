"""Generate the syscall reference section of ``docs/abi.md`` from the table.

    python -m llmos.syscalls.docgen            # rewrite docs/abi.md's generated section
    python -m llmos.syscalls.docgen --check    # exit 1 if docs/abi.md disagrees with the table
"""
from __future__ import annotations

import sys
from pathlib import Path

from llmos.syscalls.errors import ERRNOS
from llmos.syscalls.table import SYSCALLS, Arg

BEGIN = "<!-- BEGIN GENERATED: python -m llmos.syscalls.docgen -->"
END = "<!-- END GENERATED -->"


def _arg_row(a: Arg) -> str:
    bounds = []
    if a.min is not None:
        bounds.append(f">= {a.min:g}")
    if a.max is not None:
        bounds.append(f"<= {a.max:g}")
    if a.max_len is not None:
        bounds.append(f"len <= {a.max_len}")
    if a.choices:
        bounds.append("one of " + ", ".join(f"`{c}`" for c in a.choices))
    default = "required" if a.required else ("—" if a.default is None else f"`{a.default!r}`")
    return f"| `{a.name}` | {a.shape()} | {default} | {'; '.join(bounds) or '—'} | {a.doc} |"


def generate() -> str:
    out = [BEGIN, "", "### Calls", "",
           "| num | name | capability | served by | reply |", "|---|---|---|---|---|"]
    for s in SYSCALLS:
        reply = "stream" if s.stream else ("blocking" if s.blocking else "immediate")
        out.append(f"| {s.num} | [`{s.name}`](#{s.name}) | {s.cap or '—'} | {s.served_by} | {reply} |")
    for s in SYSCALLS:
        out += ["", f"#### {s.name}", "", f"Number {s.num}. Capability: {s.cap or 'none (any authenticated user)'}."
                f" {s.doc}", "", f"Returns: `{s.returns}`", ""]
        if s.args:
            out += ["| argument | type | default | bounds | meaning |", "|---|---|---|---|---|"]
            out += [_arg_row(a) for a in s.args]
        else:
            out.append("No arguments.")
    out += ["", "### Error numbers", "", "| errno | code | meaning |", "|---|---|---|"]
    out += [f"| `{name}` | {code} | {meaning} |" for name, (code, meaning) in ERRNOS.items()]
    out += ["", END]
    return "\n".join(out)


def splice(doc: str) -> str:
    head, _, rest = doc.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return head + generate() + tail


def main(argv: list[str]) -> int:
    path = Path(__file__).resolve().parent.parent / "docs" / "abi.md"
    doc = path.read_text()
    new = splice(doc)
    if "--check" in argv:
        if new != doc:
            print(f"{path} disagrees with the syscall table; run python -m llmos.syscalls.docgen")
            return 1
        return 0
    path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
