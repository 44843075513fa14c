"""The plugin's settings: the ``--kv-*`` flags, their parsing and their start-up validation.

One frozen, picklable dataclass (``DepthKVSettings``) is attached to SGLang's ``ServerArgs`` as the
underscore attribute ``_depthkv_settings`` (``ServerArgs`` is read-only except for underscore names);
it travels with the pickled ``ServerArgs`` into the spawned scheduler processes, where the pool,
allocator, tree-cache and backend hooks read it. ``None`` (no ``--kv-policy``) means: vanilla SGLang,
every hook passes through.

Every refusal raises ``DepthKVConfigError`` (a ``ValueError``) whose message starts with the flag at
fault, before any model weight is loaded.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from typing import Any, Mapping, MutableMapping, Optional

logger = logging.getLogger("sglang_depthkv")

POLICY_CHOICES = ("depthkv", "laprox", "kvzip", "snapkv", "pyramid", "streamingllm", "full")

# Engine(...) keyword -> CLI flag. The keyword names are also the argparse dests.
KWARG_TO_FLAG = {
    "kv_policy": "--kv-policy",
    "kv_budget": "--kv-budget",
    "kv_profile": "--kv-profile",
    "kv_gates": "--kv-gates",
    "kv_window": "--kv-window",
    "kv_sinks": "--kv-sinks",
    "kv_decode_interval": "--kv-decode-interval",
}

NO_AUTO_PROFILE = "none"  # --kv-profile none: no start-up calibration
DEFAULT_BUDGET = 0.3  # --kv-budget when not given (every policy but full)
DEFAULT_SINKS = 4
DEFAULT_WINDOW = 32
DEFAULT_DECODE_INTERVAL = 0  # 0: prune at the end of prefill only

# Attention backends whose reads go through the per-layer mapping (sglang/backends/).
SUPPORTED_ATTENTION_BACKENDS = ("torch_native", "triton")  # default under --kv-policy: default_attention_backend
# Model architectures whose every layer is plain full attention with an MHA/GQA KV cache.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
_MODEL_DTYPE_KV = ("auto", "bfloat16", "float16", "float32", "bf16", "fp16", "fp32", None)


_PP_WHY = ("a pipeline stage holds only its own layers, while the global top-k (laprox, kvzip) and the "
           "per-request keep decision span every layer; the stages would have to exchange scores at each "
           "prefill, which the plugin does not do")
_DP_ATTENTION_WHY = ("DP attention runs every rank's forward in lockstep, with idle batches on ranks "
                     "without requests; the plugin's per-forward scoring hooks do not handle those")
_LAPROX_WHY = "LaProx reads o_proj.weight as a float matrix; quantized weights have other layouts"


class DepthKVConfigError(ValueError):
    """A ``--kv-*`` flag (or an SGLang flag combined with it) that the plugin refuses."""

    def __init__(self, flag: str, message: str):
        self.flag = flag
        super().__init__(f"{flag}: {message}")


@dataclass(frozen=True)
class DepthKVSettings:
    policy: str
    budget: float
    profile: Optional[str] = None
    gates: Optional[str] = None
    window: int = DEFAULT_WINDOW
    sinks: int = DEFAULT_SINKS
    decode_interval: int = DEFAULT_DECODE_INTERVAL
    # depthkv with no profile given or cached: measure one at start-up, through the model runner,
    # before the KV pool is sized (patches/auto_calibration.py); ``profile`` is set then
    calibrate_at_start: bool = False

    @property
    def prunes(self) -> bool:
        return self.policy != "full" and self.budget < 1.0


def add_cli_flags(parser) -> None:
    """Add the ``--kv-*`` flags to SGLang's argparse parser (shown in ``--help``)."""
    g = parser.add_argument_group("sglang-depthkv (per-layer KV pruning under one global budget)")
    g.add_argument("--kv-policy", dest="kv_policy", choices=POLICY_CHOICES, default=None,
                   help="Per-layer KV pruning policy. Unset: vanilla SGLang (the plugin does nothing).")
    g.add_argument("--kv-budget", dest="kv_budget", type=float, default=None,
                   help="Global KV budget in (0, 1]: fraction of all (layer, token) KV slots kept "
                        f"(default {DEFAULT_BUDGET}; --kv-policy full keeps everything).")
    g.add_argument("--kv-profile", dest="kv_profile", default=None,
                   help="DepthKV sensitivity profile JSON (--kv-policy depthkv). Default: the model's cached "
                        "profile, else one calibrated at start-up on the serving device and cached; "
                        f"'{NO_AUTO_PROFILE}': the cached profile or a refusal, never a start-up calibration.")
    g.add_argument("--kv-gates", dest="kv_gates", default=None,
                   help="KVzip gate file (required by --kv-policy kvzip).")
    g.add_argument("--kv-window", dest="kv_window", type=int, default=None,
                   help=f"Recent tokens always kept (default {DEFAULT_WINDOW}).")
    g.add_argument("--kv-sinks", dest="kv_sinks", type=int, default=None,
                   help=f"First tokens always kept (default {DEFAULT_SINKS}).")
    g.add_argument("--kv-decode-interval", dest="kv_decode_interval", type=int, default=None,
                   help="Re-prune every N decode steps; 0 = prune after prefill only "
                        f"(default {DEFAULT_DECODE_INTERVAL}).")


def pop_kv_kwargs(kwargs: dict) -> dict:
    """Remove and return the ``kv_*`` keywords from ``kwargs`` (Engine / ServerArgs keywords)."""
    return {k: kwargs.pop(k) for k in list(kwargs) if k in KWARG_TO_FLAG}


def _int_flag(raw: Mapping[str, Any], key: str, default: int, lo: int) -> int:
    v = raw.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise DepthKVConfigError(KWARG_TO_FLAG[key], f"must be an integer, got {v!r}")
    if v < lo:
        raise DepthKVConfigError(KWARG_TO_FLAG[key], f"must be >= {lo}, got {v}")
    return v


def parse_settings(raw: Mapping[str, Any]) -> Optional[DepthKVSettings]:
    """Validate the ``kv_*`` values on their own. ``None`` when no policy is given (vanilla); any
    other ``kv_*`` value without a policy is refused (it would silently do nothing)."""
    unknown = [k for k in raw if k not in KWARG_TO_FLAG]
    if unknown:
        raise DepthKVConfigError(unknown[0], "unknown depthkv setting")
    policy = raw.get("kv_policy")
    given = [k for k, v in raw.items() if v is not None and k != "kv_policy"]
    if policy is None:
        if given:
            raise DepthKVConfigError(
                KWARG_TO_FLAG[given[0]], "given without --kv-policy (it would be ignored); add --kv-policy"
            )
        return None
    if policy not in POLICY_CHOICES:
        raise DepthKVConfigError("--kv-policy", f"unknown policy {policy!r}; choose from {', '.join(POLICY_CHOICES)}")

    budget = raw.get("kv_budget")
    if policy == "full":
        if budget is not None and float(budget) != 1.0:
            raise DepthKVConfigError("--kv-budget", f"--kv-policy full keeps every token; budget must be 1.0, got {budget}")
        budget = 1.0
    if budget is None:
        budget = DEFAULT_BUDGET
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise DepthKVConfigError("--kv-budget", f"must be a number in (0, 1], got {budget!r}")
    budget = float(budget)
    if not math.isfinite(budget) or not (0.0 < budget <= 1.0):
        raise DepthKVConfigError("--kv-budget", f"must be in (0, 1], got {budget}")

    profile, gates = raw.get("kv_profile"), raw.get("kv_gates")
    if policy != "depthkv" and profile is not None:
        raise DepthKVConfigError("--kv-profile", f"only used by --kv-policy depthkv, not {policy}")
    if policy == "kvzip" and gates is None:
        raise DepthKVConfigError("--kv-gates", "required with --kv-policy kvzip (a trained gate file)")
    if policy != "kvzip" and gates is not None:
        raise DepthKVConfigError("--kv-gates", f"only used by --kv-policy kvzip, not {policy}")

    window = _int_flag(raw, "kv_window", DEFAULT_WINDOW, 0)
    decode_interval = _int_flag(raw, "kv_decode_interval", DEFAULT_DECODE_INTERVAL, 0)
    if decode_interval > 0 and window == 0:
        # Decode-time pruning scores the decoded tokens with the last --kv-window queries.
        raise DepthKVConfigError("--kv-decode-interval", f"{decode_interval} re-prunes with the last --kv-window "
                                 "queries; it needs --kv-window >= 1, got 0")

    return DepthKVSettings(
        policy=policy,
        budget=budget,
        profile=None if profile is None else str(profile),
        gates=None if gates is None else str(gates),
        window=window,
        sinks=_int_flag(raw, "kv_sinks", DEFAULT_SINKS, 0),
        decode_interval=decode_interval,
    )


def is_cuda_device(device) -> bool:
    """Whether ``--device`` (unset / ``auto``: whatever torch sees) is a CUDA device."""
    if device in (None, "auto"):
        try:
            import torch

            return bool(torch.cuda.is_available())
        except Exception:  # noqa: BLE001 - no torch: not a CUDA machine
            return False
    return str(device).startswith("cuda")


def default_attention_backend(device) -> str:
    """The backend pinned under ``--kv-policy`` when the user names none (SGLang's own default, e.g.
    fa3 on Hopper, does not read through our mapping): ``triton`` on CUDA (SGLang's Triton kernels,
    CUDA-graph capable), ``torch_native`` elsewhere (the CPU path)."""
    return "triton" if is_cuda_device(device) else "torch_native"


def _requested_prefill_graph(kwargs: Mapping[str, Any]):
    """``(flag, backend)`` of the prefill CUDA-graph backend the user chose, or ``None`` when SGLang's
    default applies. Same precedence as ``ServerArgs._parse_cuda_graph_config``: the
    ``--cuda-graph-config`` JSON wins over ``--cuda-graph-backend-prefill``, which wins over the
    ``--disable-prefill-cuda-graph`` / ``disable_cuda_graph`` off-switches."""
    cfg = kwargs.get("cuda_graph_config")
    if cfg is not None and hasattr(cfg, "to_dict"):  # a CudaGraphConfig object: only its non-defaults count
        cfg = cfg.to_dict()
    if isinstance(cfg, Mapping) and isinstance(cfg.get("prefill"), Mapping) and "backend" in cfg["prefill"]:
        return "--cuda-graph-config", cfg["prefill"]["backend"]
    if kwargs.get("cuda_graph_backend_prefill") is not None:
        return "--cuda-graph-backend-prefill", kwargs["cuda_graph_backend_prefill"]
    if kwargs.get("disable_prefill_cuda_graph") or kwargs.get("disable_cuda_graph"):
        return "--disable-prefill-cuda-graph", "disabled"
    return None


_PREFILL_GRAPH_WHY = ("a captured prefill builds its ForwardBatch without ForwardBatch.init_new, so the "
                      "per-layer scoring and pruning hooks would not run")


def prepare_server_kwargs(settings: DepthKVSettings, kwargs: MutableMapping[str, Any]) -> None:
    """Before ``ServerArgs`` resolves (``kwargs``: the ``ServerArgs`` keywords, or ``vars()`` of the
    CLI namespace): pin the attention backend when the user left it unset, and keep prefill out of
    CUDA graphs. SGLang 0.5.17 captures prefill with its breakable CUDA-graph backend by default on
    CUDA; under ``--kv-policy`` the plugin sets SGLang's own ``--disable-prefill-cuda-graph`` then,
    and refuses a prefill graph backend the user asked for."""
    if kwargs.get("attention_backend") is None:
        kwargs["attention_backend"] = default_attention_backend(kwargs.get("device"))
    requested = _requested_prefill_graph(kwargs)
    if requested is not None:
        flag, backend = requested
        if backend != "disabled":
            raise DepthKVConfigError(flag, f"prefill CUDA graph backend {backend!r} is not supported with "
                                     f"--kv-policy ({_PREFILL_GRAPH_WHY}); decode CUDA graphs stay supported")
    elif is_cuda_device(kwargs.get("device")):
        kwargs["disable_prefill_cuda_graph"] = True
        logger.info("sglang-depthkv: --kv-policy sets --disable-prefill-cuda-graph (prefill runs eagerly; "
                    "decode CUDA graphs stay on)")


def check_server_args(settings: DepthKVSettings, sa) -> None:
    """Refuse, by name, the SGLang configurations the per-layer pool does not support (yet)."""
    g = lambda name, default=None: getattr(sa, name, default)  # noqa: E731
    if g("page_size") not in (None, 1):
        raise DepthKVConfigError("--page-size", f"{g('page_size')} not supported with --kv-policy (page_size 1 only: "
                                 "pruning frees single tokens; paged allocators free whole pages)")
    if g("speculative_algorithm"):
        raise DepthKVConfigError("--speculative-algorithm", "speculative decoding is not supported with --kv-policy "
                                 "(the draft pool and move_kv_cache are not per-layer)")
    if g("enable_hierarchical_cache"):
        raise DepthKVConfigError("--enable-hierarchical-cache", "not supported with --kv-policy (host pools mirror a "
                                 "uniform per-layer slot layout)")
    if (g("pp_size") or 1) > 1:
        raise DepthKVConfigError("--pp-size", f"{g('pp_size')} not supported with --kv-policy ({_PP_WHY})")
    if g("enable_dp_attention"):
        raise DepthKVConfigError("--enable-dp-attention", f"not supported with --kv-policy ({_DP_ATTENTION_WHY}); "
                                 "plain --dp-size replicas and --tp-size are supported")
    on_cuda = is_cuda_device(g("device"))
    for name in ("attention_backend", "prefill_attention_backend", "decode_attention_backend"):
        v = g(name)
        if v is not None and v not in SUPPORTED_ATTENTION_BACKENDS:
            raise DepthKVConfigError("--" + name.replace("_", "-"),
                                     f"{v!r} not supported with --kv-policy; supported: {', '.join(SUPPORTED_ATTENTION_BACKENDS)}")
        if v == "torch_native" and on_cuda:
            raise DepthKVConfigError("--" + name.replace("_", "-"),
                                     "'torch_native' on CUDA is not supported with --kv-policy (it syncs with the "
                                     "host thousands of times per step and SGLang turns CUDA graphs off for it); "
                                     "use triton, the CUDA backend under --kv-policy")
    if g("enable_torch_compile"):
        raise DepthKVConfigError("--enable-torch-compile", "not supported with --kv-policy (the per-layer pool "
                                 "swap and the scoring hooks run Python per layer and are not compile-safe)")
    prefill_graph = getattr(getattr(g("cuda_graph_config"), "prefill", None), "backend", None)
    if prefill_graph not in (None, "disabled"):
        raise DepthKVConfigError("--cuda-graph-backend-prefill", f"prefill CUDA graph backend {prefill_graph!r} "
                                 f"is not supported with --kv-policy ({_PREFILL_GRAPH_WHY}); pass "
                                 "--cuda-graph-backend-prefill disabled")
    if settings.policy == "laprox":
        for name in ("quantization", "modelopt_quant"):
            if g(name):
                raise DepthKVConfigError("--" + name.replace("_", "-"), f"{g(name)!r} not supported with "
                                         f"--kv-policy laprox ({_LAPROX_WHY})")
    if g("radix_cache_backend"):
        raise DepthKVConfigError("--radix-cache-backend", "the plugin installs its own per-layer radix cache; "
                                 "do not combine --kv-policy with another radix-cache backend")
    if g("enable_unified_memory"):
        raise DepthKVConfigError("--enable-unified-memory", "not supported with --kv-policy")
    if g("enable_page_major_kv_layout"):
        raise DepthKVConfigError("--enable-page-major-kv-layout", "not supported with --kv-policy")
    if g("kv_cache_dtype") not in _MODEL_DTYPE_KV:
        raise DepthKVConfigError("--kv-cache-dtype", f"{g('kv_cache_dtype')!r} not supported with --kv-policy "
                                 "(quantized KV caches have other layouts)")
    dm = g("disaggregation_mode")
    if dm not in (None, "null"):
        raise DepthKVConfigError("--disaggregation-mode", f"{dm!r} not supported with --kv-policy")
    if g("enable_session_radix_cache") or g("enable_streaming_session"):
        raise DepthKVConfigError("--enable-session-radix-cache", "session / streaming radix caches are not supported "
                                 "with --kv-policy")
    if g("enable_lora"):
        raise DepthKVConfigError("--enable-lora", "not supported with --kv-policy")


def check_model(settings: DepthKVSettings, hf_config, model_path: Optional[str] = None) -> None:
    """Refuse models whose attention is not plain per-layer MHA/GQA (MLA, sliding window, hybrid), and
    quantized checkpoints under LaProx (``model_path``: the local directory, for ``hf_quant_config.json``)."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not archs or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise DepthKVConfigError("--model-path", f"architecture {archs} not supported with --kv-policy; "
                                 f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if getattr(hf_config, "kv_lora_rank", None):
        raise DepthKVConfigError("--model-path", "MLA models are not supported with --kv-policy")
    if getattr(hf_config, "use_sliding_window", False) or (
        getattr(hf_config, "sliding_window", None) and "use_sliding_window" not in hf_config.to_dict()
    ):
        raise DepthKVConfigError("--model-path", "sliding-window attention models are not supported with --kv-policy")
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise DepthKVConfigError("--model-path", f"hybrid models (layer types {sorted(set(layer_types))}) are not "
                                 "supported with --kv-policy")
    if settings.policy == "laprox":
        quant = getattr(hf_config, "quantization_config", None) or getattr(hf_config, "compression_config", None)
        if quant is None and model_path and os.path.isfile(os.path.join(str(model_path), "hf_quant_config.json")):
            quant = "hf_quant_config.json"  # ModelOpt checkpoints keep it beside config.json
        if quant is not None:
            method = (quant.get("quant_method", "?") if isinstance(quant, Mapping)
                      else getattr(quant, "quant_method", quant))
            raise DepthKVConfigError("--model-path", f"quantized checkpoint ({method}) not supported with "
                                     f"--kv-policy laprox ({_LAPROX_WHY})")


def model_identity(hf_config):
    from sglang_depthkv.core.types import ModelIdentity

    return ModelIdentity.from_hf_config(hf_config)


def check_files(settings: DepthKVSettings, hf_config) -> None:
    """Load the profile / gate file against the model; their loaders raise ValueError subclasses."""
    identity = model_identity(hf_config)
    if settings.profile is not None:
        try:
            from sglang_depthkv.core.profile import load_profile
        except ImportError as e:  # the core module is another issue's; never ignore the flag
            raise DepthKVConfigError("--kv-profile", f"cannot load profiles: {e}") from e
        try:
            load_profile(settings.profile, identity)
        except ValueError as e:
            raise DepthKVConfigError("--kv-profile", str(e)) from e
    if settings.gates is not None:
        try:
            from sglang_depthkv.core.gates import load_gates
        except ImportError as e:
            raise DepthKVConfigError("--kv-gates", f"cannot load gate files: {e}") from e
        try:
            load_gates(settings.gates, identity)
        except ValueError as e:
            raise DepthKVConfigError("--kv-gates", str(e)) from e


def scores_with_laprox(settings: DepthKVSettings, hf_config) -> bool:
    """Whether the policy scores tokens with LaProx: ``--kv-policy laprox``, or ``depthkv`` with a
    profile calibrated with LaProx (the scorer DepthKV serves with is the profile's)."""
    if settings.policy == "laprox":
        return True
    if settings.policy != "depthkv" or settings.profile in (None, NO_AUTO_PROFILE):
        return False
    from sglang_depthkv.core.profile import load_profile

    return load_profile(settings.profile, model_identity(hf_config)).scorer == "laprox"


def check_head_split(settings: DepthKVSettings, hf_config, tp_size: int) -> None:
    """LaProx mixes the query heads of a kv head (``Scorer.mixes_query_heads``); with more
    tensor-parallel ranks than kv heads SGLang replicates each kv head and splits its query heads over
    ranks, so no rank could score it. Refused for ``--kv-policy laprox`` and for a DepthKV profile
    calibrated with LaProx."""
    if tp_size <= 1 or not scores_with_laprox(settings, hf_config):
        return
    kvh = model_identity(hf_config).num_key_value_heads
    if tp_size > kvh:
        what = "--kv-policy laprox" if settings.policy == "laprox" else "a --kv-profile calibrated with laprox"
        raise DepthKVConfigError("--tp-size", f"{tp_size} exceeds the model's {kvh} kv heads: SGLang then splits "
                                 f"each kv head's query heads over ranks, and {what} scores a token from all the "
                                 f"query heads of its kv head together; use --tp-size <= {kvh}")


def check_budget_fits(settings: DepthKVSettings, context_len: int) -> None:
    """A budget must leave room for the always-kept sinks + window of a full-length request."""
    protected = settings.sinks + settings.window
    if settings.prunes and settings.budget * context_len < protected:
        raise DepthKVConfigError(
            "--kv-budget",
            f"{settings.budget} keeps {settings.budget * context_len:.0f} of {context_len} tokens per layer, "
            f"less than --kv-sinks {settings.sinks} + --kv-window {settings.window} = {protected}",
        )


def load_hf_config(sa):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(sa.model_path, trust_remote_code=bool(getattr(sa, "trust_remote_code", False)))
    except Exception as e:  # noqa: BLE001 - named error, not a fallback
        raise DepthKVConfigError("--model-path", f"cannot read the model config of {sa.model_path!r}: {e}") from e


def resolve_profile(settings: DepthKVSettings, sa) -> DepthKVSettings:
    """``depthkv`` without a profile file: the model's cached profile (``core.profile_cache``), else a
    start-up calibration (``calibrate_at_start``; one rank only), or, with ``--kv-profile none``, a
    refusal that names the command writing one."""
    if settings.policy != "depthkv" or settings.profile not in (None, NO_AUTO_PROFILE):
        return settings
    from sglang_depthkv.core.profile_cache import cache_dir, find_cached_profile

    model = getattr(sa, "model_path", None)
    calibrate = f"python -m sglang_depthkv calibrate --model {model}"
    try:
        path = find_cached_profile(model)
    except ValueError as e:
        raise DepthKVConfigError("--kv-profile", f"not given, and no cached profile can be chosen: {e}") from e
    log = logging.getLogger("sglang_depthkv")
    if path is not None:
        log.info("sglang-depthkv: --kv-profile %s (the model's cached profile)", path)
        return replace(settings, profile=str(path))
    where = cache_dir() / "profiles"
    if settings.profile == NO_AUTO_PROFILE:
        raise DepthKVConfigError("--kv-profile", f"{NO_AUTO_PROFILE}: {where} has no profile for this model and "
                                 f"start-up calibration is off; run `{calibrate}` once or pass --kv-profile PATH")
    ranks = [(flag, getattr(sa, name, 1) or 1) for flag, name in (("--tp-size", "tp_size"), ("--dp-size", "dp_size"))]
    several = [f"{flag} {n}" for flag, n in ranks if n > 1]
    if several:
        raise DepthKVConfigError("--kv-profile", f"not given, {where} has no profile for this model, and start-up "
                                 f"calibration runs on one rank ({', '.join(several)} given); run `{calibrate}` "
                                 "once or pass --kv-profile PATH")
    log.info("sglang-depthkv: no cached profile for this model in %s: calibrating at start-up (once; cached)", where)
    return replace(settings, profile=None, calibrate_at_start=True)


def validate_all(settings: DepthKVSettings, sa) -> None:
    check_server_args(settings, sa)
    hf = load_hf_config(sa)
    check_model(settings, hf, getattr(sa, "model_path", None))
    check_files(settings, hf)
    check_head_split(settings, hf, int(getattr(sa, "tp_size", 1) or 1))
    ctx = getattr(sa, "context_length", None) or getattr(hf, "max_position_embeddings", None) or 0
    if ctx:
        check_budget_fits(settings, int(ctx))


def settings_of(server_args) -> Optional[DepthKVSettings]:
    """The settings attached to a resolved ``ServerArgs`` (``None``: vanilla)."""
    return getattr(server_args, "_depthkv_settings", None)
