"""Print the operations as a Markdown table (for the README), from the registry.

    python -m scripts.operations_table
"""

from __future__ import annotations

import sys

from server.operations import default_registry

TILING = {"local": "tiled", "two_phase": "two-phase", "global": "whole"}


def describe(spec) -> str:
    if spec.type == "choice":
        allowed = "/".join(spec.choices)
    elif spec.type == "bool":
        allowed = "bool"
    else:
        lo, hi = (int(v) if float(v).is_integer() else v for v in (spec.min, spec.max))
        allowed = f"{lo}–{hi}" + (" odd" if spec.odd else "")
    return f"`{spec.name}`={spec.default} ({allowed})"


def main() -> int:
    print("| operation | what it does | parameters (default, range) | large images |")
    print("|---|---|---|---|")
    for op in default_registry().values():
        params = ", ".join(describe(p) for p in op.params) or "—"
        print(f"| `{op.name}` | {op.description} | {params} | {TILING[op.tiling]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
