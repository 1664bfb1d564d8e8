"""The keys that differ between two params files, one per line: `key: old -> new`, or `key: removed` for a whole section.

usage: python scripts/params_diff.py BASE.yaml CHANGED.yaml      (comments and layout ignored; scripts/quality-run's params.diff)
"""

from __future__ import annotations

import sys
from typing import Any

import yaml


def diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    lines = []
    for k in sorted(set(a) | set(b), key=str):
        key, x, y = f"{prefix}{k}", a.get(k, "<absent>"), b.get(k, "<absent>")
        if isinstance(x, dict) and isinstance(y, dict):
            lines += diff(x, y, key + ".")
        elif y == "<absent>":
            lines.append(f"{key}: removed")
        elif x != y:
            lines.append(f"{key}: {x!r} -> {y!r}")
    return lines


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/params_diff.py BASE.yaml CHANGED.yaml")
    base, changed = (yaml.safe_load(open(p, encoding="utf-8")) for p in sys.argv[1:])
    print("\n".join(diff(base, changed)))
