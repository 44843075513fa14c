"""Haystack text for long-context tasks: public-domain novels shipped as package data.

The files are ``sglang_depthkv/data/austen_<name>.txt.gz`` (extracted from the Debian package
r-cran-janeaustenr by ``benchmarks/data/extract_austen.py``). ``emma``, ``persuasion`` and
``northanger`` are the task haystacks; ``pride`` is reserved for calibration so that a profile is
never fitted on the text it is evaluated on.
"""

from __future__ import annotations

import gzip
import re
from functools import lru_cache
from importlib import resources

HAYSTACK_NOVELS = ("emma", "persuasion", "northanger")
CALIBRATION_NOVELS = ("pride",)
NOVELS = HAYSTACK_NOVELS + CALIBRATION_NOVELS


class HaystackError(ValueError):
    """An unknown novel name or a missing/corrupt data file."""


@lru_cache(maxsize=None)
def load_novel(name: str) -> str:
    """The full text of one novel (str, ``\\n`` line ends)."""
    if name not in NOVELS:
        raise HaystackError(f"unknown novel {name!r}; available: {', '.join(NOVELS)}")
    res = resources.files("sglang_depthkv.data").joinpath(f"austen_{name}.txt.gz")
    if not res.is_file():
        raise HaystackError(f"haystack file {res} is missing; run benchmarks/data/extract_austen.py")
    try:
        text = gzip.decompress(res.read_bytes()).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise HaystackError(f"haystack file {res} is corrupt: {exc}") from exc
    if len(text) < 100_000:
        raise HaystackError(f"haystack file {res} holds only {len(text)} characters")
    return text


def paragraphs(name: str) -> list[str]:
    """The novel's paragraphs (blank-line separated, internal line breaks folded to spaces),
    without chapter/volume headings and other short lines."""
    out = []
    for block in re.split(r"\n\s*\n", load_novel(name)):
        para = " ".join(block.split())
        if len(para) >= 40:
            out.append(para)
    return out


def haystack_text(names: tuple[str, ...] | list[str] = HAYSTACK_NOVELS) -> str:
    """The named novels' paragraphs concatenated (paragraphs joined by blank lines)."""
    if isinstance(names, str):
        raise HaystackError("pass a sequence of novel names, not a single string")
    if not names:
        raise HaystackError("no novel names given")
    return "\n\n".join(p for n in names for p in paragraphs(n))
