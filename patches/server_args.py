"""Hooks on ``ServerArgs``: the ``--kv-*`` flags (CLI) and the ``kv_*`` keywords (``Engine(...)``).

The settings are validated before ``ServerArgs`` resolves (flag values; the attention backend and the
prefill CUDA graph are settled there, ``config.prepare_server_kwargs``) and right after (SGLang flags
they cannot be combined with, the model, the profile / gate files), then attached as the underscore
attribute ``_depthkv_settings``, which survives the pickle into the scheduler processes.
"""

from __future__ import annotations

from sglang_depthkv.sglang import config as C


def _attach(sa, settings) -> None:
    from sglang_depthkv.patches.registry import verify_applied

    verify_applied()
    C.validate_all(settings, sa)
    object.__setattr__(sa, "_depthkv_settings", settings)


def add_cli_args_after(result, parser):
    C.add_cli_flags(parser)
    return result


def from_cli_args_around(orig, cls, args):
    raw = {k: getattr(args, k) for k in C.KWARG_TO_FLAG if hasattr(args, k)}
    settings = C.parse_settings(raw)
    if settings is None:
        return orig(cls, args)
    C.prepare_server_kwargs(settings, vars(args))  # the namespace's own dict: edits reach ``orig``
    sa = orig(cls, args)
    _attach(sa, settings)
    return sa


def init_around(orig, self, *args, **kwargs):
    raw = C.pop_kv_kwargs(kwargs)
    settings = C.parse_settings(raw) if raw else None
    if settings is None:
        return orig(self, *args, **kwargs)
    C.prepare_server_kwargs(settings, kwargs)
    orig(self, *args, **kwargs)
    _attach(self, settings)
