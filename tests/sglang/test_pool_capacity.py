"""Capacity: Llama-3.1-8B shapes, a 50 GiB KV budget. Vanilla's token count comes from SGLang's own
``DefaultPoolConfigurator`` (its cell-size formula) on a real ``KVCacheConfigurator``; ours from
``DepthKVPoolConfigurator`` on the same object, with metadata counted."""

import shutil
import sys
from pathlib import Path

import pytest
import torch

from sglang_depthkv.sglang.capacity import GIB, layer_capacities, metadata_bytes, plan_for_bytes, plan_for_tokens
from sglang_depthkv.sglang.config import parse_settings

BUDGET = 50 * GIB


@pytest.fixture(autouse=True)
def single_rank():
    """One attention-TP rank, as a real single-GPU launch publishes it."""
    from sglang.srt.runtime_context import get_parallel

    with get_parallel().override(attn_tp_size=1):
        yield


@pytest.fixture(scope="module")
def kvc(tmp_path_factory):
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator
    from sglang.srt.model_executor.model_runner_components.layer_setup import ModelLayerInfo
    from sglang.srt.server_args import ServerArgs
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    d = tmp_path_factory.mktemp("llama31_8b")
    shutil.copy(Path(__file__).parent / "data" / "llama31_8b_config.json", d / "config.json")
    sa = ServerArgs(model_path=str(d), device="cpu", skip_tokenizer_init=True, dtype="bfloat16",
                    chunked_prefill_size=16384)
    mc = ModelConfig.from_server_args(sa)
    return KVCacheConfigurator(
        device="cpu", gpu_id=0, ps=None, pp_group=None, model=None, model_config=mc, server_args=sa,
        kv_cache_dtype=torch.bfloat16, model_dtype=torch.bfloat16, page_size=1, sliding_window_size=None,
        spec_algorithm=SpeculativeAlgorithm.NONE, is_draft_worker=False, post_capture_kv_active=False,
        spec_aux_config=None, is_hybrid_swa=False, is_hybrid_swa_compress=False, use_mla_backend=False,
        layer_info=ModelLayerInfo(start_layer=0, end_layer=32, num_effective_layers=32), forward_stream=None,
        req_to_token_pool=None, token_to_kv_pool_allocator=None, memory_pool_config=None,
    )


def test_llama31_8b_budget_03_holds_3x_vanilla(kvc):
    from sglang.srt.model_executor.pool_configurator import DefaultPoolConfigurator

    from sglang_depthkv.sglang.configurator import DepthKVPoolConfigurator

    vanilla = DefaultPoolConfigurator(kvc).calculate_pool_sizes(BUDGET, 1).max_total_num_tokens
    assert vanilla == BUDGET // (8 * 128 * 2 * 32 * 2)  # 409600: kv_heads*(k+v dims)*layers*bf16
    import tempfile

    sys_path = str(Path(__file__).parent)
    if sys_path not in sys.path:
        sys.path.insert(0, sys_path)
    from dkv_support import make_profile

    prof = make_profile(Path(tempfile.mkdtemp()) / "p.json", num_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=128, hidden_size=4096)
    for policy in ("snapkv", "streamingllm", "laprox", "pyramid", "depthkv"):
        extra = {"kv_profile": str(prof)} if policy == "depthkv" else {}
        conf = DepthKVPoolConfigurator(kvc, parse_settings({"kv_policy": policy, "kv_budget": 0.3, **extra}))
        cfg = conf.calculate_pool_sizes(BUDGET, 1)
        plan = cfg.depthkv_plan
        assert plan.total_bytes() <= BUDGET  # KV + mapping + free lists inside the same bytes
        assert plan.headroom == 16384
        ratio = cfg.max_total_num_tokens / vanilla
        assert ratio >= 3.0, (policy, ratio)
        print(f"{policy}: vanilla {vanilla}, depthkv {cfg.max_total_num_tokens}, ratio {ratio:.3f}")
        print(plan.table(policy, 0.3))


def test_budget_1_gives_vanilla_minus_metadata(kvc):
    from sglang.srt.model_executor.pool_configurator import DefaultPoolConfigurator

    from sglang_depthkv.sglang.configurator import DepthKVPoolConfigurator

    vanilla = DefaultPoolConfigurator(kvc).calculate_pool_sizes(BUDGET, 1).max_total_num_tokens
    conf = DepthKVPoolConfigurator(kvc, parse_settings({"kv_policy": "full"}))
    n = conf.calculate_pool_sizes(BUDGET, 1).max_total_num_tokens
    # every layer holds every token: only the slot-0 rows and metadata are lost (< 0.5 %)
    assert vanilla * 0.995 <= n < vanilla
    # with SGLang's --max-total-tokens cap the logical capacity is exactly the cap
    assert conf.calculate_pool_sizes_from_max_tokens(4096, 1).max_total_num_tokens == 4096


def test_plan_is_the_largest_fitting_n():
    fr = [0.2, 0.5, 1.0, 0.3]
    p = plan_for_bytes(10_000_000, fr, headroom=64, bytes_per_slot=512)
    assert p.total_bytes() <= 10_000_000
    n1 = p.logical_tokens + 1
    caps = layer_capacities(n1, fr, 64)
    assert sum((c + 1) * 512 for c in caps) + metadata_bytes(n1, caps) > 10_000_000
    # capacities: ceil(f*N)+H, never above N (brute force in exact rationals)
    from fractions import Fraction
    import math

    n = p.logical_tokens
    want = [min(n, math.ceil(Fraction(f) * n) + 64) for f in fr]
    assert list(p.capacities) == want
    assert p.capacities[2] == n


@pytest.mark.parametrize("bad", [[], [0.0], [1.5], [float("nan")]])
def test_bad_fractions_refused(bad):
    with pytest.raises(ValueError, match="fractions"):
        plan_for_tokens(100, bad, 0, 16)


def test_budget_too_small_for_one_token():
    with pytest.raises(ValueError, match="mem-fraction-static"):
        plan_for_bytes(100, [0.5], headroom=10, bytes_per_slot=64)


def test_hooks_pass_through_without_policy(kvc):
    """With the plugin loaded and no --kv-policy, SGLang's own configurator and sizes come back."""
    from sglang.srt.model_executor import pool_configurator as pc
    from sglang.srt.plugins import load_plugins

    load_plugins()
    assert getattr(kvc.server_args, "_depthkv_settings", None) is None
    conf = pc.create_memory_pool_configurator(kvc)  # the hooked factory
    assert type(conf) is pc.DefaultPoolConfigurator
    assert conf.calculate_pool_sizes(BUDGET, 1).max_total_num_tokens == 409600
