"""The per-model cache of DepthKV profiles, so ``--kv-policy depthkv`` works without ``--kv-profile``.

A model directory's key is a hash of its ``config.json`` bytes and of its weight files' names and
sizes (``*.safetensors``, ``*.bin``, ``*.gguf``, ``*.pt``): the model's identity, without reading the
weights. A profile lives at ``<cache>/profiles/<key>-<scorer>.json`` with ``<cache>`` =
``$SGLANG_DEPTHKV_CACHE`` (default ``~/.cache/sglang-depthkv``). ``python -m sglang_depthkv calibrate
--model M`` writes there when ``--out`` is not given; the plugin looks there at start-up when
``--kv-profile`` is not given. The profile itself is still checked against the model's shapes when
it is loaded (``core.profile.load_profile``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
DEFAULT_SCORER = "snapkv"


def cache_dir() -> Path:
    return Path(os.environ.get("SGLANG_DEPTHKV_CACHE", Path.home() / ".cache" / "sglang-depthkv"))


def model_key(model_dir) -> str:
    """16 hex digits identifying a local model directory (config bytes + weight file names / sizes)."""
    d = Path(model_dir)
    config = d / "config.json"
    if not d.is_dir() or not config.is_file():
        raise ValueError(f"{model_dir}: not a local model directory with a config.json")
    h = hashlib.sha256(config.read_bytes())
    weights = sorted(p for p in d.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not weights:
        raise ValueError(f"{model_dir}: no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    for p in weights:
        h.update(f"\0{p.name}\0{p.stat().st_size}".encode())
    return h.hexdigest()[:16]


def cached_profile_path(model_dir, scorer: str = DEFAULT_SCORER, root: Optional[Path] = None) -> Path:
    """Where ``calibrate`` writes the profile of ``model_dir`` measured with ``scorer``."""
    return (root or cache_dir()) / "profiles" / f"{model_key(model_dir)}-{scorer}.json"


def find_cached_profile(model_dir, root: Optional[Path] = None) -> Optional[Path]:
    """The cached profile of ``model_dir``: the default scorer's, else the only one there; None when
    there is none. Several profiles of other scorers are ambiguous: ValueError naming them."""
    default = cached_profile_path(model_dir, DEFAULT_SCORER, root)
    if default.is_file():
        return default
    found = sorted(default.parent.glob(f"{model_key(model_dir)}-*.json"))
    if len(found) > 1:
        raise ValueError(f"several cached profiles for this model ({', '.join(p.name for p in found)} in "
                         f"{default.parent}); choose one with --kv-profile")
    return found[0] if found else None


__all__ = ["cache_dir", "cached_profile_path", "find_cached_profile", "model_key"]
