"""Hooks on ``ServerArgs``: the ``--kv-*`` flags (CLI) and the ``kv_*`` keywords (``Engine(...)``).

The settings are validated before ``ServerArgs`` resolves (flag values; the attention backend and the
prefill CUDA graph are settled there, ``config.prepare_server_kwargs``) and right after (SGLang flags
they cannot be combined with, the model, the profile / gate files), then attached as the underscore
attribute ``_depthkv_settings``, which survives the pickle into the scheduler processes.

On the command line (``ServerArgs.from_cli_args``: ``launch_server``, ``sglang serve``) a refusal is a
usage error, reported as argparse reports its own: one ``error: --flag: ...`` line on stderr and exit
status 2, before anything is started. From Python (``Engine(...)``, ``ServerArgs(...)``) it stays a
``DepthKVConfigError`` (a ``ValueError``).
"""

from __future__ import annotations

import logging
import sys

from sglang_depthkv.sglang import config as C

logger = logging.getLogger("sglang_depthkv")

DECODE_OUTSIDE_BUDGET = ("sglang-depthkv: decoded tokens are kept at every layer and are outside the --kv-budget "
                         "(set --kv-decode-interval N to re-prune them every N steps)")


def log_startup_limits(settings) -> None:
    """The limits of a valid configuration that a user would not see otherwise (one WARNING each)."""
    if settings.prunes and settings.decode_interval == 0:
        logger.warning(DECODE_OUTSIDE_BUDGET)
    if settings.policy == "depthkv" and settings.profile is not None:
        log_profile_hull(settings.profile)


def log_profile_hull(path) -> None:
    """One line on the profile points water-filling does not use (above their layer's lower convex
    hull): a WARNING when some are non-monotone (measurement noise), else INFO."""
    from sglang_depthkv.core.budgets.depthkv import profile_hull_report
    from sglang_depthkv.core.profile import load_profile

    report, non_monotone = profile_hull_report(load_profile(path))
    line = f"sglang-depthkv: profile {path}: {report}"
    if non_monotone:
        logger.warning(line + "; calibrating on more samples (calibrate --samples) reduces such noise")
    else:
        logger.info(line)


def _attach(sa, settings) -> None:
    from sglang_depthkv.patches.registry import verify_applied

    verify_applied()
    settings = C.resolve_profile(settings, sa)
    C.validate_all(settings, sa)
    object.__setattr__(sa, "_depthkv_settings", settings)
    log_startup_limits(settings)


def add_cli_args_after(result, parser):
    C.add_cli_flags(parser)
    return result


def cli_refusal(err: C.DepthKVConfigError) -> SystemExit:
    """Print ``err`` the way argparse prints a usage error (one line on stderr, no traceback) and
    return the ``SystemExit(2)`` to raise."""
    sys.stderr.write("error: " + " ".join(str(err).splitlines()) + "\n")
    sys.stderr.flush()
    return SystemExit(2)


def from_cli_args_around(orig, cls, args):
    try:
        return _from_cli_args(orig, cls, args)
    except C.DepthKVConfigError as e:
        raise cli_refusal(e) from e  # the refusal stays reachable as __cause__


def _from_cli_args(orig, cls, args):
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
