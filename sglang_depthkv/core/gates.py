"""KVzip-style keep gates (the Fast-KVzip idea): a tiny linear gate per (layer, kv head).

Gate
    r[g, t, i] = sqrt(k[g, t, i]² + k[g, t, i + d/2]²)      i < d/2: the key's norm in each RoPE plane
    x[g, t] = [ r[g, t] / ||r[g, t]|| , h[t] / ||h[t]|| ]      (key part, hidden part per the spec)
    score[g, t] = sigmoid(w[l, g] · x[g, t] + b[l, g])  in [0, 1], higher = keep
``k`` is the post-RoPE key of kv head ``g`` (``LayerObservation.keys``), ``h`` the attention input
after the input norm (``LayerObservation.hidden_states``). RoPE rotates the dimension pairs
``(i, i + d/2)`` (the rotate-half layout of Llama, Qwen and Mistral in transformers and SGLang) by
an angle that grows with the position, so the norm of each pair does not depend on the position.
Why not the key itself: a linear gate on the post-RoPE key direction learns the phases of the
slow RoPE planes at the training positions and extrapolates them past the training length (gates
trained on 2k-token contexts kept 56% of an 8k prompt's slots in its last quarter).

Target (KVzip's query-agnostic reconstruction score), forward passes of the frozen model only:
feed ``context (n) + repeat prompt (p) + context (n)`` from position 0 with full causal attention;
for each original-context pair (layer l, kv head g, token t < n) the target is the max attention
probability it receives from the repeated-context queries ``n+p .. 2n+p-1``, max over those queries
and over the query heads of the kv group (head h is in group h // (qh // kvh)).

Fit: closed-form ridge regression per (layer, kv head) of ``logit(clamp(target, 1e-6, 1-1e-6))`` on
the features, with an unpenalised bias (features centred), penalty ``lambda = ridge * N`` for ``N``
training pairs. The model is never updated and nothing is back-propagated.

File: safetensors with tensors ``weight [L, kvh, F]`` and ``bias [L, kvh]`` (float32) and one
metadata entry ``"sglang-depthkv"`` holding a JSON header ``{"format": "sglang-depthkv-gates",
"version": 2, "model": ModelIdentity fields, "features": {...}, "training": {...}}``. Version 1
files (gates on the post-RoPE key direction) are refused: retrain them with ``train-gates``.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from .types import LayerObservation, ModelIdentity

GATE_FORMAT = "sglang-depthkv-gates"
GATE_VERSION = 2
META_KEY = "sglang-depthkv"
TARGET_EPS = 1e-6
DEFAULT_REPEAT_PROMPT = "\n\nRepeat the previous context exactly:\n"


class GateFileError(ValueError):
    """A gate file is missing, malformed, of another format/version, or for another model."""


@dataclass(frozen=True)
class FeatureSpec:
    use_key: bool = True
    use_hidden: bool = True
    head_dim: int = 0
    hidden_size: int = 0

    @property
    def key_dim(self) -> int:
        """Features of the key part: one norm per RoPE plane."""
        return (self.head_dim // 2) * self.use_key

    @property
    def dim(self) -> int:
        return self.key_dim + self.hidden_size * self.use_hidden

    def check(self) -> None:
        if not (self.use_key or self.use_hidden):
            raise ValueError("a gate needs at least one feature: key and/or hidden state")
        if self.use_key and (self.head_dim < 2 or self.head_dim % 2):
            raise ValueError(f"key features need an even head_dim (RoPE planes), got {self.head_dim}")


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def rope_plane_norms(keys: torch.Tensor) -> torch.Tensor:
    """``[..., d/2]`` float32: the norm of each RoPE plane ``(i, i + d/2)`` of keys ``[..., d]``,
    unchanged by the rotation RoPE applies at any position."""
    k = keys.float()
    half = k.shape[-1] // 2
    return torch.hypot(k[..., :half], k[..., half:])


def _key_part(keys: torch.Tensor) -> torch.Tensor:
    """The key part of the gate features: unit RoPE-plane norms (one definition for the feature
    builder and the chunked gate)."""
    return _unit(rope_plane_norms(keys))


def gate_features(spec: FeatureSpec, keys: torch.Tensor, hidden: Optional[torch.Tensor]) -> torch.Tensor:
    """Features ``[kvh, n, F]`` from keys ``[kvh, n, d]`` and hidden states ``[n, hidden]``."""
    parts = []
    kvh, n = keys.shape[0], keys.shape[1]
    if spec.use_key:
        if keys.shape[2] != spec.head_dim:
            raise ValueError(f"keys have head_dim {keys.shape[2]}, the gates expect {spec.head_dim}")
        parts.append(_key_part(keys))
    if spec.use_hidden:
        if hidden is None:
            raise ValueError("these gates use hidden states but the observation has none "
                             "(prefill with capture_hidden=True)")
        if hidden.shape != (n, spec.hidden_size):
            raise ValueError(f"hidden states {tuple(hidden.shape)}, expected ({n}, {spec.hidden_size})")
        parts.append(_unit(hidden.float())[None].expand(kvh, n, spec.hidden_size))
    return torch.cat(parts, dim=-1)


@dataclass
class KVzipGates:
    identity: ModelIdentity
    spec: FeatureSpec
    weight: torch.Tensor  # [L, kvh, F]
    bias: torch.Tensor  # [L, kvh]
    training: dict = field(default_factory=dict)

    def __post_init__(self):
        self.spec.check()
        L, kvh = self.identity.num_layers, self.identity.num_key_value_heads
        if tuple(self.weight.shape) != (L, kvh, self.spec.dim):
            raise ValueError(f"gate weight {tuple(self.weight.shape)}, expected {(L, kvh, self.spec.dim)}")
        if tuple(self.bias.shape) != (L, kvh):
            raise ValueError(f"gate bias {tuple(self.bias.shape)}, expected {(L, kvh)}")
        if not (torch.isfinite(self.weight).all() and torch.isfinite(self.bias).all()):
            raise ValueError("gate parameters contain NaN/inf")
        self.weight = self.weight.float()
        self.bias = self.bias.float()

    def to(self, device) -> "KVzipGates":
        """These gates with their parameters on ``device`` (float32): the gate multiplies features of
        the observations, which live on the model's device. Already validated, so not re-checked
        (that would read the values back)."""
        moved = copy.copy(self)
        moved.weight = self.weight.to(device=device, dtype=torch.float32)
        moved.bias = self.bias.to(device=device, dtype=torch.float32)
        moved.training = dict(self.training)
        return moved

    def shard(self, heads: Sequence[int]) -> "KVzipGates":
        """These gates restricted to the kv heads ``heads`` (a tensor-parallel rank's heads,
        ``core.rank_sum.HeadShard.kv_heads()``): observations of that rank have only those heads."""
        heads = [int(h) for h in heads]
        kvh = self.identity.num_key_value_heads
        if not heads or any(not 0 <= h < kvh for h in heads):
            raise ValueError(f"gate shard heads {heads} outside the gates' {kvh} kv heads")
        idx = torch.tensor(heads, dtype=torch.int64, device=self.weight.device)
        part = copy.copy(self)
        part.weight = self.weight.index_select(1, idx)
        part.bias = self.bias.index_select(1, idx)
        part.training = dict(self.training)
        return part

    @property
    def num_kv_heads(self) -> int:
        """kv heads these gates score (all of the model's, or a shard's)."""
        return int(self.weight.shape[1])

    def logits(self, obs: LayerObservation) -> torch.Tensor:
        if not 0 <= obs.layer < self.identity.num_layers:
            raise ValueError(f"observation layer {obs.layer} outside the gates' {self.identity.num_layers} layers")
        if obs.num_kv_heads != self.num_kv_heads:
            raise ValueError(f"observation has {obs.num_kv_heads} kv heads, gates {self.num_kv_heads}")
        if self.weight.device != obs.keys.device:
            raise ValueError(f"gates on {self.weight.device}, observation on {obs.keys.device}: move them once "
                             "with KVzipGates.to(device)")
        return self._chunked_logits(obs.layer, obs.keys, obs.hidden_states) + self.bias[obs.layer][:, None]

    def _chunked_logits(self, layer: int, keys: torch.Tensor, hidden: Optional[torch.Tensor]) -> torch.Tensor:
        """``w · gate_features`` without building the ``[kvh, n, F]`` features: the key part and the
        hidden part are applied separately, over chunks of ``CHUNK`` tokens (transient per chunk:
        ``kvh * CHUNK * head_dim`` floats of upcast keys, ``kvh * CHUNK * head_dim / 2`` of plane norms,
        ``CHUNK * hidden`` of hidden features)."""
        from .scorers.window_attention import token_chunks

        spec, w = self.spec, self.weight[layer]
        kvh, n = keys.shape[0], keys.shape[1]
        gate_features(spec, keys[:, :0], None if hidden is None else hidden[:0])  # shape checks only
        if spec.use_hidden and hidden.shape[0] != n:
            raise ValueError(f"hidden states {tuple(hidden.shape)}, expected ({n}, {spec.hidden_size})")
        out = torch.empty((kvh, n), dtype=torch.float32, device=keys.device)
        for lo, hi in token_chunks(n):
            acc = torch.zeros((kvh, hi - lo), dtype=torch.float32, device=keys.device)
            off = 0
            if spec.use_key:
                acc += torch.einsum("gnd,gd->gn", _key_part(keys[:, lo:hi]), w[:, :spec.key_dim])
                off = spec.key_dim
            if spec.use_hidden:
                acc += (_unit(hidden[lo:hi].float()) @ w[:, off:off + spec.hidden_size].t()).t()
            out[:, lo:hi] = acc
        return out

    def scores(self, obs: LayerObservation) -> torch.Tensor:
        """Keep scores ``[kvh, n]`` in [0, 1], float32."""
        return torch.sigmoid(self.logits(obs)).float()

    # ------------------------------------------------------------------ file
    def header(self) -> dict:
        return {
            "format": GATE_FORMAT,
            "version": GATE_VERSION,
            "model": asdict(self.identity),
            "features": {**asdict(self.spec), "dim": self.spec.dim, "key": "rope plane norms (i, i+d/2)",
                         "key_norm": "l2", "hidden_norm": "l2",
                         "gate": "sigmoid(w.x+b)"},
            "training": self.training,
        }

    def save(self, path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}, str(path),
                  metadata={META_KEY: json.dumps(self.header())})
        return path


def save_gates(gates: KVzipGates, path) -> Path:
    return gates.save(path)


def load_gates(path, expected: Optional[ModelIdentity] = None) -> KVzipGates:
    """Load a gate file; GateFileError naming the problem (missing file, not a gate file, wrong
    format/version, another model's shape, bad tensors)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise GateFileError(f"gate file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a corrupt file
        raise GateFileError(f"gate file {path} is not a readable safetensors file: {exc}") from exc
    if META_KEY not in meta:
        raise GateFileError(f"gate file {path} has no {META_KEY!r} header (not a gate file)")
    try:
        header = json.loads(meta[META_KEY])
    except json.JSONDecodeError as exc:
        raise GateFileError(f"gate file {path}: header is not valid JSON: {exc}") from exc
    if header.get("format") != GATE_FORMAT:
        raise GateFileError(f"gate file {path}: format {header.get('format')!r}, expected {GATE_FORMAT!r}")
    if header.get("version") != GATE_VERSION:
        raise GateFileError(f"gate file {path}: version {header.get('version')!r}, expected {GATE_VERSION} "
                            "(version 1 gates read the post-RoPE key direction; retrain them with "
                            "`python -m sglang_depthkv train-gates`)")
    try:
        identity = ModelIdentity(**header["model"])
        feats = header["features"]
        spec = FeatureSpec(use_key=bool(feats["use_key"]), use_hidden=bool(feats["use_hidden"]),
                           head_dim=int(feats["head_dim"]), hidden_size=int(feats["hidden_size"]))
    except (KeyError, TypeError) as exc:
        raise GateFileError(f"gate file {path}: header is missing or has bad fields: {exc}") from exc
    if expected is not None and identity.shape_fields() != expected.shape_fields():
        raise GateFileError(
            f"gate file {path} was trained for model {identity.name or '?'} {identity.shape_fields()}, "
            f"not for {expected.name or '?'} {expected.shape_fields()}"
        )
    if set(tensors) != {"weight", "bias"}:
        raise GateFileError(f"gate file {path}: tensors {sorted(tensors)}, expected ['bias', 'weight']")
    try:
        return KVzipGates(identity, spec, tensors["weight"], tensors["bias"], header.get("training", {}))
    except ValueError as exc:
        raise GateFileError(f"gate file {path}: {exc}") from exc


# ---------------------------------------------------------------------- targets and fitting
@dataclass
class GateTrainingData:
    """Per layer: features ``[kvh, N, F]`` and targets ``[kvh, N]`` (max attention probabilities)."""

    features: list
    targets: list


def reconstruction_targets(ref_model, context_ids, repeat_ids) -> tuple[list, list, list]:
    """KVzip targets for one context. Returns per layer ``(targets [kvh, n], keys [kvh, n, d],
    hidden [n, hidden])`` of the n context tokens (keys/hidden from the first copy of the context)."""
    ctx = torch.as_tensor(context_ids, dtype=torch.int64).reshape(-1)
    rep = torch.as_tensor(repeat_ids, dtype=torch.int64).reshape(-1)
    n, p = ctx.numel(), rep.numel()
    if n == 0:
        raise ValueError("empty context")
    ids = torch.cat([ctx, rep, ctx])
    state, hidden, _ = ref_model.capture_forward(ids, capture_hidden=True, prob_capture=(n + p, 2 * n + p, n))
    targets = [state.max_probs[l] for l in range(ref_model.num_layers)]
    keys = [state.keys[l][:, :n] for l in range(ref_model.num_layers)]
    hid = [hidden[l][:n] for l in range(ref_model.num_layers)]
    return targets, keys, hid


def logit_targets(targets: torch.Tensor) -> torch.Tensor:
    t = targets.double().clamp(TARGET_EPS, 1 - TARGET_EPS)
    return torch.log(t) - torch.log1p(-t)


def ridge_fit(x: torch.Tensor, y: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ridge of y [N] on x [N, F] with unpenalised bias (float64). Returns (w [F], b)."""
    x, y = x.double(), y.double()
    n, f = x.shape
    xm, ym = x.mean(0), y.mean()
    xc, yc = x - xm, y - ym
    a = xc.T @ xc + ridge * n * torch.eye(f, dtype=torch.float64)
    w = torch.linalg.solve(a, xc.T @ yc)
    return w, ym - xm @ w


def fit_gates(identity: ModelIdentity, spec: FeatureSpec, features: Sequence[torch.Tensor],
              targets: Sequence[torch.Tensor], ridge: float = 1e-3, training: Optional[dict] = None) -> KVzipGates:
    """Fit every (layer, kv head) gate. ``features[l]`` is ``[kvh, N, F]``, ``targets[l]`` ``[kvh, N]``
    with values in [0, 1]."""
    spec.check()
    if ridge <= 0 or not math.isfinite(ridge):
        raise ValueError(f"ridge must be > 0, got {ridge}")
    L, kvh = identity.num_layers, identity.num_key_value_heads
    if len(features) != L or len(targets) != L:
        raise ValueError(f"need features/targets for {L} layers, got {len(features)}/{len(targets)}")
    weight = torch.zeros(L, kvh, spec.dim, dtype=torch.float64)
    bias = torch.zeros(L, kvh, dtype=torch.float64)
    for l in range(L):
        x, t = features[l], targets[l]
        if x.shape[0] != kvh or x.shape[2] != spec.dim or tuple(t.shape) != tuple(x.shape[:2]):
            raise ValueError(f"layer {l}: features {tuple(x.shape)} / targets {tuple(t.shape)} do not fit "
                             f"({kvh} kv heads, {spec.dim} features)")
        if torch.isnan(t).any() or (t < 0).any() or (t > 1).any():
            raise ValueError(f"layer {l}: targets must lie in [0, 1]")
        y = logit_targets(t)
        for g in range(kvh):
            weight[l, g], bias[l, g] = ridge_fit(x[g], y[g], ridge)
    return KVzipGates(identity, spec, weight.float(), bias.float(), dict(training or {}, ridge=ridge))


def collect_training_data(ref_model, contexts: Sequence, repeat_ids, spec: FeatureSpec) -> GateTrainingData:
    """Targets and features for every context, concatenated over contexts per layer."""
    feats = [[] for _ in range(ref_model.num_layers)]
    targs = [[] for _ in range(ref_model.num_layers)]
    for ctx in contexts:
        targets, keys, hidden = reconstruction_targets(ref_model, ctx, repeat_ids)
        for l in range(ref_model.num_layers):  # the fit is small float64 algebra: on the host
            feats[l].append(gate_features(spec, keys[l], hidden[l]).cpu())
            targs[l].append(targets[l].float().cpu())
    return GateTrainingData([torch.cat(f, dim=1) for f in feats], [torch.cat(t, dim=1) for t in targs])


def train_gates(ref_model, contexts: Sequence, repeat_ids, use_key: bool = True, use_hidden: bool = True,
                ridge: float = 1e-3, progress=None) -> KVzipGates:
    """Targets from forward passes of the frozen model, then closed-form ridge per (layer, kv head)."""
    if not contexts:
        raise ValueError("no training contexts")
    ident = ref_model.identity
    spec = FeatureSpec(use_key=use_key, use_hidden=use_hidden, head_dim=ident.head_dim,
                       hidden_size=ident.hidden_size)
    spec.check()
    contexts = list(contexts)
    data = collect_training_data(ref_model, progress(contexts) if progress else contexts, repeat_ids, spec)
    info = {"contexts": len(contexts),
            "context_tokens": [int(torch.as_tensor(c).numel()) for c in contexts],
            "repeat_tokens": int(torch.as_tensor(repeat_ids).numel()),
            "target": "max attention prob from repeated-context queries (KVzip)"}
    return fit_gates(ident, spec, data.features, data.targets, ridge=ridge, training=info)
