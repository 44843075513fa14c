"""What the soak reads from the scheduler, on real SGLang / plugin objects in-process: a per-layer
leak reaches SGLang's own idle leak report (strict mode: ValueError) and the invariant log; the
drain check; the per-layer request-length limit; the pressure counters."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from dkv_support import build  # noqa: E402

from sglang_depthkv.sglang.invariants import drained_violations  # noqa: E402


@pytest.fixture(scope="module")
def server_args(tmp_path_factory):
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs
    from tiny_models import save_tiny_model

    load_plugins()
    llama = str(save_tiny_model(tmp_path_factory.mktemp("llama"), "llama", seed=0))
    return ServerArgs(model_path=llama, device="cpu", skip_tokenizer_init=True, kv_policy="snapkv", kv_budget=0.5)


def real_checker(server_args, alloc, tree, r2t):
    """SGLang's own idle checker and pool-stats observer over our allocator and tree."""
    from sglang.srt.disaggregation.utils import DisaggregationMode
    from sglang.srt.managers.scheduler_components.invariant_checker import SchedulerInvariantChecker
    from sglang.srt.managers.scheduler_components.pool_stats_observer import SchedulerPoolStatsObserver

    common = dict(tree_cache=tree, token_to_kv_pool_allocator=alloc, req_to_token_pool=r2t, is_hybrid_swa=False,
                  is_hybrid_ssm=False, full_tokens_per_layer=None, swa_tokens_per_layer=None,
                  max_total_num_tokens=alloc.size, get_last_batch=lambda: None, get_running_batch=lambda: None)
    obs = SchedulerPoolStatsObserver(session_controller=None, hisparse_coordinator=None, enable_hisparse=False,
                                     **common)
    chk = SchedulerInvariantChecker(disaggregation_mode=DisaggregationMode.NULL, page_size=1,
                                    server_args=server_args, pool_stats_observer=obs, **common)
    return chk, obs


def fill_tree(alloc, tree, n=6, prune_layer=1, pruned=(1, 2)):
    """n tokens in the tree (evictable), some pruned at one layer."""
    from array import array

    from sglang.srt.mem_cache.base_prefix_cache import InsertParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    ids = alloc.alloc(n)
    alloc.prune([prune_layer], [ids[list(pruned)]])
    tree.insert(InsertParams(key=RadixKey(array("l", range(10, 10 + n))), value=ids))
    return ids


def test_per_layer_leak_reaches_sglangs_idle_leak_report(server_args, tmp_path, monkeypatch):
    from sglang.srt.environ import envs

    from sglang_depthkv.sglang import invariant_log

    log = tmp_path / "inv.jsonl"
    monkeypatch.setenv(invariant_log.ENV, str(log))
    pool, alloc, r2t, tree = build(capacities=(24, 12, 16), size=24)
    chk, obs = real_checker(server_args, alloc, tree, r2t)
    fill_tree(alloc, tree)
    has_leak, msgs = chk._check_all_pools(obs.get_pool_stats())  # the hooked SGLang method
    assert not has_leak, msgs
    assert chk._check_all_pools(obs.get_pool_stats()) == (False, msgs)  # same state: counted, not repeated
    # a slot of layer 2 disappears (neither free nor mapped): SGLang's logical check cannot see it
    held = torch.nonzero(pool.mapping[2]).reshape(-1)
    pool.mapping[2, held[0]] = 0  # its slot is now neither free nor mapped
    has_leak, msgs = chk._check_all_pools(obs.get_pool_stats())
    assert has_leak
    assert any("layer 2" in m and "slot leak" in m for m in msgs), msgs
    assert envs.SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE.get()  # SGLang's default: strict
    with pytest.raises(ValueError, match="layer 2"):  # what Scheduler.on_idle does with has_leak
        chk._report_leak("pool", "\n".join(msgs))
    lines = [json.loads(l) for l in log.read_text().splitlines()]
    assert [(l["kind"], l["ok"], l["checks"]) for l in lines] == [("idle", True, 1), ("idle", False, 3)]
    assert lines[0]["free"] == [18, 8, 10] and lines[0]["tree_evictable"] == [6, 4, 6]
    assert lines[1]["violations"] and not lines[1]["sglang_has_leak"]  # ours, not SGLang's logical check


def test_drain_check(server_args):
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    pool, alloc, r2t, tree = build(capacities=(24, 12, 16), size=24)
    fill_tree(alloc, tree)
    assert drained_violations(alloc) != []  # the tree still holds slots
    tree.evict(EvictParams(num_tokens=tree.evictable_size()))
    assert drained_violations(alloc) == []
    ids = alloc.alloc(3)  # held by nobody the drain knows of
    out = drained_violations(alloc)
    assert sum("still held after evicting the whole tree" in m for m in out) == 3, out
    assert any(m.startswith("logical: 3 of 24") for m in out), out
    alloc.free(ids)
    assert drained_violations(alloc) == []


def test_per_layer_request_limits():
    from sglang_depthkv.patches.request_limits import per_layer_request_limits

    assert per_layer_request_limits(4095, [2304, 666, 700]) == (665, 660)  # smallest layer binds
    assert per_layer_request_limits(500, [2304, 666]) == (500, 495)  # context / logical pool binds
    with pytest.raises(ValueError, match="no room"):
        per_layer_request_limits(100, [1, 50])


def test_pressure_counters_count_evicted_slots_per_layer(server_args, monkeypatch):
    from sglang.srt.mem_cache import common
    from sglang.srt.plugins.hook_registry import HookRegistry

    from sglang_depthkv.sglang import pressure

    assert "sglang.srt.mem_cache.common.evict_from_tree_cache" in HookRegistry._patched  # SGLang's, hooked

    counters = pressure.PressureCounters()
    monkeypatch.setattr(pressure, "COUNTERS", counters)
    pool, alloc, r2t, tree = build(capacities=(24, 12, 16), size=24)
    fill_tree(alloc, tree, n=6, prune_layer=1, pruned=(1, 2))
    common.evict_from_tree_cache(tree, 5)  # every layer has 5 free: nothing evicted
    assert counters.evictions == 0 and alloc.layer_available_sizes() == [18, 8, 10]
    # layer 1 has 12 - 6 + 2 = 8 free while the logical pool has 18: asking for 10 must still evict
    common.evict_from_tree_cache(tree, 10)
    assert min(alloc.layer_available_sizes()) >= 10
    assert counters.evictions == 1 and counters.evicted_tokens == 6  # the one leaf of 6 tokens
    assert counters.evicted_slots == [6, 4, 6]  # the 2 tokens pruned at layer 1 freed no slot there
    assert alloc.layer_available_sizes() == [24, 12, 16]
    assert torch.count_nonzero(alloc.mapping) == 0


def test_production_idle_check_is_throttled_accounting(server_args, monkeypatch):
    """Content checks off: the idle hook runs the per-layer accounting check at most once per period
    (a slot lost at one layer is still caught then), never the full structural scan."""
    from sglang_depthkv.patches import invariant_checker
    from sglang_depthkv.sglang import checks

    monkeypatch.setenv(checks.ENV, "0")
    monkeypatch.setenv(invariant_checker.PERIOD_ENV, "3600")
    monkeypatch.setattr(invariant_checker, "_last_light", None)
    monkeypatch.setattr("sglang_depthkv.sglang.invariants.structural_violations",
                        lambda alloc: pytest.fail("structural scan in production mode"))
    pool, alloc, r2t, tree = build(capacities=(24, 12, 16), size=24)
    chk, obs = real_checker(server_args, alloc, tree, r2t)
    fill_tree(alloc, tree)
    alloc.alloc(2)  # held by a request the idle check does not know of: accounting is off by 2 per layer
    has_leak, msgs = chk._check_all_pools(obs.get_pool_stats())
    assert has_leak and any("[depthkv layer 0]" in m for m in msgs), msgs
    has_leak, msgs = chk._check_all_pools(obs.get_pool_stats())  # within the period: not run again
    assert not any("depthkv" in m for m in msgs), msgs
