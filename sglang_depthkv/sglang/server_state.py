"""The plugin's state as SGLang's ``/server_info`` reports it (``patches/server_info.py``): plain
JSON values, read from the host-side settings and capacity plan (no device read)."""

from __future__ import annotations

from dataclasses import asdict


def plugin_state(settings, alloc, max_req_len: int, max_req_input_len: int, model_runner) -> dict:
    pool = alloc.get_kvcache()
    plan = getattr(pool, "depthkv_plan", None)
    ps = model_runner.ps
    return {
        "settings": asdict(settings),
        "layer_fractions": None if plan is None else [float(f) for f in plan.fractions],
        "layer_capacities": [int(c) for c in alloc.layer_capacities],
        "logical_capacity": int(alloc.size),
        "max_req_len": int(max_req_len),
        "max_req_input_len": int(max_req_input_len),
        "context_len": int(model_runner.model_config.context_len),
        "tp_rank": int(ps.tp_rank), "tp_size": int(ps.tp_size),
        "dp_rank": None if ps.dp_rank is None else int(ps.dp_rank), "dp_size": int(ps.dp_size),
    }
