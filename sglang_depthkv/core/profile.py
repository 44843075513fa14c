"""DepthKV sensitivity profiles: versioned JSON, validated on load against the model.

File format (version 1)::

    {"format": "sglang-depthkv-profile", "version": 1,
     "model": {ModelIdentity fields},            # num_layers, num_attention_heads, ...
     "scorer": "snapkv",                          # scorer used when measuring
     "keep_fractions": [f_1, ..., f_F],           # strictly increasing, in (0, 1]
     "sensitivity": [[KL at f_1..f_F] per layer], # shape (num_layers, F), finite, >= 0
     "metric": "kl_next_token",
     "calibration": {...}}                        # settings of the calibration run; "pool_kernel":
                                                  # the pooled scorer's kernel, which DepthKV then
                                                  # serves with (absent: the scorer's default);
                                                  # "score": the scorer's formula name
                                                  # (``Scorer.definition``), required and matched
                                                  # for scorers that have one (LaProx)

KL at keep fraction 1.0 is 0 by definition (nothing pruned); it is implied when 1.0 is not listed,
and must be 0 when it is. Every error is a ``ProfileError`` (a ``ValueError``) naming the problem
and the file.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

from .types import ModelIdentity

FORMAT = "sglang-depthkv-profile"
VERSION = 1
REQUIRED_KEYS = ("format", "version", "model", "scorer", "keep_fractions", "sensitivity", "metric", "calibration")
_INT_MODEL_FIELDS = ("num_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size")
_STR_MODEL_FIELDS = ("architecture", "name")


class ProfileError(ValueError):
    """A profile file (or object) that cannot be used; the message names the problem and the path."""


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_identity(model, where: str) -> ModelIdentity:
    if isinstance(model, ModelIdentity):
        model = asdict(model)
    if not isinstance(model, dict):
        raise ProfileError(f"{where}: 'model' must be an object with the model identity, got {type(model).__name__}")
    missing = [k for k in _INT_MODEL_FIELDS if k not in model]
    if missing:
        raise ProfileError(f"{where}: 'model' is missing {', '.join(missing)}")
    unknown = sorted(set(model) - set(_INT_MODEL_FIELDS) - set(_STR_MODEL_FIELDS))
    if unknown:
        raise ProfileError(f"{where}: 'model' has unknown fields {', '.join(unknown)}")
    for k in _INT_MODEL_FIELDS:
        v = model[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ProfileError(f"{where}: model.{k} must be a positive integer, got {v!r}")
    for k in _STR_MODEL_FIELDS:
        if k in model and not isinstance(model[k], str):
            raise ProfileError(f"{where}: model.{k} must be a string, got {model[k]!r}")
    return ModelIdentity(**model)


@dataclass
class SensitivityProfile:
    """Per-layer sensitivity curves: ``sensitivity[l][i]`` = metric (KL) when only layer ``l`` is
    pruned to ``keep_fractions[i]``."""

    model: ModelIdentity
    scorer: str
    keep_fractions: list
    sensitivity: list
    metric: str = "kl_next_token"
    calibration: dict = field(default_factory=dict)

    def __post_init__(self):
        self.validate("SensitivityProfile")

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    def curve(self, layer: int) -> list:
        """``[(fraction, KL), ...]`` for one layer, ending at ``(1.0, 0.0)`` (implied if not measured)."""
        pts = list(zip(self.keep_fractions, self.sensitivity[layer]))
        if self.keep_fractions[-1] < 1.0:
            pts.append((1.0, 0.0))
        return pts

    def validate(self, where: str) -> None:
        """Normalise the fields (floats, lists) and raise ProfileError naming the first problem."""
        self.model = _check_identity(self.model, where)
        from .scorers import PROFILE_SCORERS

        if not isinstance(self.scorer, str) or not self.scorer:
            raise ProfileError(f"{where}: 'scorer' must be a non-empty string, got {self.scorer!r}")
        if self.scorer not in PROFILE_SCORERS:
            raise ProfileError(f"{where}: 'scorer' {self.scorer!r} is not one DepthKV calibrates and serves with "
                               f"({', '.join(PROFILE_SCORERS)})")
        if not isinstance(self.metric, str) or not self.metric:
            raise ProfileError(f"{where}: 'metric' must be a non-empty string, got {self.metric!r}")
        if not isinstance(self.calibration, dict):
            raise ProfileError(f"{where}: 'calibration' must be an object, got {type(self.calibration).__name__}")
        want, got = PROFILE_SCORERS[self.scorer].definition, self.calibration.get("score")
        if want and got != want:
            raise ProfileError(f"{where}: measured with another {self.scorer} score "
                               f"({'none recorded' if got is None else repr(got)}) than this version's {want!r}; "
                               f"re-calibrate with `python -m sglang_depthkv calibrate --scorer {self.scorer}`")
        if "pool_kernel" in self.calibration:
            from .scorers import profile_scorer

            try:
                profile_scorer(self.scorer, self.calibration["pool_kernel"])
            except (ValueError, TypeError) as e:
                raise ProfileError(f"{where}: calibration.pool_kernel: {e}") from None
        fr = self.keep_fractions
        if not isinstance(fr, (list, tuple)) or not fr or not all(_number(f) for f in fr):
            raise ProfileError(f"{where}: 'keep_fractions' must be a non-empty list of numbers, got {fr!r}")
        fr = [float(f) for f in fr]
        if any(not (0.0 < f <= 1.0) for f in fr):  # NaN fails too
            raise ProfileError(f"{where}: keep_fractions must lie in (0, 1], got {fr}")
        if any(b <= a for a, b in zip(fr, fr[1:])):
            raise ProfileError(f"{where}: keep_fractions must be strictly increasing, got {fr}")
        sens = self.sensitivity
        L, F = self.model.num_layers, len(fr)
        if not isinstance(sens, (list, tuple)) or not all(isinstance(r, (list, tuple)) for r in sens):
            raise ProfileError(f"{where}: 'sensitivity' must be a list of per-layer lists")
        shape = (len(sens), sorted({len(r) for r in sens}))
        if len(sens) != L or any(len(r) != F for r in sens):
            raise ProfileError(f"{where}: sensitivity shape ({shape[0]} layers, row lengths {shape[1]}) != "
                               f"(num_layers={L}, len(keep_fractions)={F})")
        rows = []
        for l, r in enumerate(sens):
            for i, v in enumerate(r):
                if not _number(v):
                    raise ProfileError(f"{where}: sensitivity[{l}][{i}] is not a number: {v!r}")
                if math.isnan(v) or math.isinf(v):
                    raise ProfileError(f"{where}: sensitivity[{l}][{i}] is {v} (must be finite)")
                if v < 0:
                    raise ProfileError(f"{where}: sensitivity[{l}][{i}] = {v} is negative")
            rows.append([float(v) for v in r])
        if fr[-1] == 1.0:
            bad = [l for l, r in enumerate(rows) if r[-1] != 0.0]
            if bad:
                raise ProfileError(f"{where}: sensitivity at keep fraction 1.0 must be 0 (nothing pruned), "
                                   f"layers {bad[:5]} have {[rows[l][-1] for l in bad[:5]]}")
        self.keep_fractions = fr
        self.sensitivity = rows

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "model": asdict(self.model), "scorer": self.scorer,
                "keep_fractions": list(self.keep_fractions), "sensitivity": [list(r) for r in self.sensitivity],
                "metric": self.metric, "calibration": dict(self.calibration)}

    @classmethod
    def from_dict(cls, doc, where: str = "profile") -> "SensitivityProfile":
        if not isinstance(doc, dict):
            raise ProfileError(f"{where}: top level must be a JSON object, got {type(doc).__name__}")
        if "format" not in doc or doc["format"] != FORMAT:
            raise ProfileError(f"{where}: not a DepthKV profile (format {doc.get('format')!r}, expected {FORMAT!r})")
        if "version" not in doc or doc["version"] != VERSION or isinstance(doc["version"], bool):
            raise ProfileError(f"{where}: unknown profile version {doc.get('version')!r} (this build reads {VERSION})")
        missing = [k for k in REQUIRED_KEYS if k not in doc]
        if missing:
            raise ProfileError(f"{where}: missing keys {', '.join(missing)}")
        unknown = sorted(set(doc) - set(REQUIRED_KEYS))
        if unknown:
            raise ProfileError(f"{where}: unknown keys {', '.join(unknown)}")
        obj = cls.__new__(cls)
        obj.model, obj.scorer, obj.metric = doc["model"], doc["scorer"], doc["metric"]
        obj.keep_fractions, obj.sensitivity, obj.calibration = doc["keep_fractions"], doc["sensitivity"], doc["calibration"]
        obj.validate(where)
        return obj


def check_model(profile: SensitivityProfile, expected: ModelIdentity, where: str) -> None:
    """ProfileError unless the profile's shape fields equal the model's (the name is not compared)."""
    if not isinstance(expected, ModelIdentity):
        raise ValueError(f"expected must be a ModelIdentity or None, got {type(expected).__name__}")
    mine, theirs = profile.model.shape_fields(), expected.shape_fields()
    diff = [k for k in mine if mine[k] != theirs[k]]
    if not diff:
        return
    head = (f"profile is for {mine['num_layers']} layers / {mine['num_key_value_heads']} kv heads, model has "
            f"{theirs['num_layers']} / {theirs['num_key_value_heads']}")
    detail = ", ".join(f"{k}: profile {mine[k]}, model {theirs[k]}" for k in diff)
    raise ProfileError(f"{where}: {head} ({detail})")


def load_profile(path: Union[str, os.PathLike], expected: Optional[ModelIdentity] = None) -> SensitivityProfile:
    """Read and validate a profile file; with ``expected``, also check it is for that model."""
    p = Path(path)
    where = f"profile {p}"
    if not p.is_file():
        raise ProfileError(f"{where}: no such file")
    try:
        doc = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProfileError(f"{where}: invalid JSON ({e})") from None
    profile = SensitivityProfile.from_dict(doc, where)
    if expected is not None:
        check_model(profile, expected, where)
    return profile


def save_profile(profile: SensitivityProfile, path: Union[str, os.PathLike]) -> Path:
    """Write ``profile`` as version-1 JSON (atomically: temp file, then rename); returns the path."""
    if not isinstance(profile, SensitivityProfile):
        raise ValueError(f"save_profile needs a SensitivityProfile, got {type(profile).__name__}")
    p = Path(path)
    profile.validate(f"profile {p}")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(profile.to_dict(), indent=1, allow_nan=False))
    os.replace(tmp, p)
    return p


__all__ = ["FORMAT", "VERSION", "ProfileError", "SensitivityProfile", "check_model", "load_profile", "save_profile"]
