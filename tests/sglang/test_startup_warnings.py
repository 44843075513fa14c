"""The start-up WARNING lines that make a configuration's limits visible: decoded tokens outside the
budget (``--kv-decode-interval 0``), and a request-length cap below the model's context (the
smallest layer's capacity). Each is tested where it is computed, without starting an engine."""

import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sglang_depthkv.patches import request_limits, server_args  # noqa: E402
from sglang_depthkv.sglang.config import parse_settings  # noqa: E402

DECODE_LINE = ("sglang-depthkv: decoded tokens are kept at every layer and are outside the --kv-budget "
               "(set --kv-decode-interval N to re-prune them every N steps)")


def plugin_records(caplog, level=logging.WARNING):
    return [r for r in caplog.records if r.name == "sglang_depthkv" and r.levelno == level]


# --- decoded tokens outside the budget ------------------------------------------------------------

@pytest.mark.parametrize(
    "raw, warns",
    [
        ({"kv_policy": "snapkv", "kv_budget": 0.3}, True),  # default --kv-decode-interval 0
        ({"kv_policy": "streamingllm", "kv_budget": 0.5, "kv_decode_interval": 0}, True),
        ({"kv_policy": "snapkv", "kv_budget": 0.3, "kv_decode_interval": 8}, False),  # re-pruned
        ({"kv_policy": "full"}, False),  # nothing is pruned
        ({"kv_policy": "snapkv", "kv_budget": 1.0}, False),  # a budget of 1 keeps everything
    ],
)
def test_decode_interval_warning(caplog, raw, warns):
    caplog.set_level(logging.INFO, logger="sglang_depthkv")
    server_args.log_startup_limits(parse_settings(raw))
    assert [r.getMessage() for r in plugin_records(caplog)] == ([DECODE_LINE] if warns else [])


def test_decode_interval_warning_once_per_server_args(caplog, tmp_path):
    """Emitted once where ``ServerArgs`` gets the settings attached (the launcher, before any process
    is started)."""
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs
    from tiny_models import save_tiny_model

    load_plugins()
    model = str(save_tiny_model(tmp_path, "llama", seed=0))
    caplog.set_level(logging.INFO, logger="sglang_depthkv")
    ServerArgs(model_path=model, device="cpu", skip_tokenizer_init=True, kv_policy="snapkv", kv_budget=0.3)
    assert [r.getMessage() for r in plugin_records(caplog)] == [DECODE_LINE]
    caplog.clear()
    ServerArgs(model_path=model, device="cpu", skip_tokenizer_init=True, kv_policy="snapkv", kv_budget=0.3,
               kv_decode_interval=4)
    assert plugin_records(caplog) == []


# --- request-length cap below the context ---------------------------------------------------------

class DepthKVAllocator:  # the hook recognises the plugin's allocator by its class name
    def __init__(self, caps):
        self.layer_capacities = caps


def worker(caps, context_len, allocator=DepthKVAllocator):
    return SimpleNamespace(model_runner=SimpleNamespace(token_to_kv_pool_allocator=allocator(caps)),
                           model_config=SimpleNamespace(context_len=context_len))


def worker_info(max_req_len):
    """The tuple ``TpModelWorker.get_worker_info`` returns, with vanilla's request limits."""
    info = [0] * 12
    info[request_limits.MAX_REQ_LEN], info[request_limits.MAX_REQ_INPUT_LEN] = max_req_len, max_req_len - 5
    return tuple(info)


def test_request_cap_warning(caplog):
    caplog.set_level(logging.INFO, logger="sglang_depthkv")
    info = request_limits.get_worker_info_around(lambda self: worker_info(4095), worker([2304, 666, 700], 4096))
    assert (info[request_limits.MAX_REQ_LEN], info[request_limits.MAX_REQ_INPUT_LEN]) == (665, 660)
    assert [r.getMessage() for r in plugin_records(caplog)] == [
        "sglang-depthkv: requests are limited to 665 tokens (the smallest layer's capacity) below the model's "
        "context of 4096; raise --kv-budget or --mem-fraction-static, or use a policy with a larger smallest layer"
    ]


@pytest.mark.parametrize(
    "caps, max_req_len, allocator",
    [
        ([8192, 5000], 4095, DepthKVAllocator),  # every layer holds a full-context request
        ([2304, 666], 500, DepthKVAllocator),  # the logical pool binds first (vanilla's own limit)
        ([100, 50], 4095, type("TokenToKVPoolAllocator", (), {"__init__": DepthKVAllocator.__init__})),  # vanilla
    ],
)
def test_no_request_cap_warning(caplog, caps, max_req_len, allocator):
    caplog.set_level(logging.INFO, logger="sglang_depthkv")
    info = request_limits.get_worker_info_around(lambda self: worker_info(max_req_len),
                                                 worker(caps, 4096, allocator))
    assert info[request_limits.MAX_REQ_LEN] == max_req_len
    assert plugin_records(caplog) == []


# --- DepthKV profile points water-filling does not use --------------------------------------------

@pytest.mark.parametrize("noisy", [False, True])
def test_depthkv_profile_points_above_the_hull_are_reported(caplog, tmp_path, noisy):
    """The profile's points above their layer's lower convex hull are named at start-up: a WARNING when
    one is non-monotone (KL rising with the keep fraction), else one INFO line."""
    from sglang_depthkv.core.profile import SensitivityProfile, save_profile
    from sglang_depthkv.core.types import ModelIdentity

    ident = ModelIdentity(num_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, hidden_size=128,
                          architecture="LlamaForCausalLM")
    sens = [[0.5, 0.6 if noisy else 0.45, 0.1], [0.9, 0.4, 0.1]]
    path = save_profile(SensitivityProfile(ident, "snapkv", [0.1, 0.25, 0.5], sens), tmp_path / "p.json")
    caplog.set_level(logging.INFO, logger="sglang_depthkv")
    server_args.log_startup_limits(parse_settings({"kv_policy": "depthkv", "kv_profile": str(path),
                                                   "kv_decode_interval": 4}))
    warnings, infos = plugin_records(caplog), plugin_records(caplog, logging.INFO)
    lines = [r.getMessage() for r in (warnings if noisy else infos)]
    assert len(lines) == 1 and lines[0].startswith(f"sglang-depthkv: profile {path}: ")
    if noisy:
        assert "1 of 6 measured points lie above" in lines[0] and "layer 0 f=0.25 KL 0.6 > hull 0.35 (non-monotone)" in lines[0]
    else:  # 0.45 at f=0.25 is above the chord 0.5 -> 0.1 (0.35): non-convex, not non-monotone
        assert warnings == [] and "1 of 6 measured points" in lines[0] and "(0 non-monotone" in lines[0]
