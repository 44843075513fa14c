"""How the benchmarks' results name paths and commands: without the checkout's location.

A result records the commands it ran so that they can be run again. The repository's own files are
named relative to its root (the scripts run from there), and an interpreter as ``python``, so the
same run records the same text on every checkout and no workspace path lands in a committed file.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

ROOT = Path(__file__).resolve().parent.parent


def shown(path) -> str:
    """``path`` relative to the repository root when it lies inside it, else absolute."""
    p = Path(path).resolve()
    try:
        return p.relative_to(ROOT).as_posix()
    except ValueError:
        return str(p)


def shown_command(cmd: Sequence[str]) -> List[str]:
    """``cmd`` as a result records it: a leading interpreter (any ``python*`` executable, wherever
    it lies) as ``python``, and every argument that is an absolute path inside the repository
    relative to it. Other arguments (flags, values, paths outside the repository) stay as given."""
    out = [str(a) for a in cmd]
    if out and Path(out[0]).name.startswith("python"):
        out[0] = "python"
    return [shown(a) if a.startswith("/") else a for a in out]
