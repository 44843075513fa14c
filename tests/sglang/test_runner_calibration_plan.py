"""What start-up calibration measures on a given server (``runner_calibration.plan_for``): the
``calibrate`` defaults, a shorter context when the pool or the model's context holds less, a
one-line refusal when too little is left."""

import pytest

from sglang_depthkv.sglang import runner_calibration as RC
from sglang_depthkv.sglang.config import DepthKVConfigError, DepthKVSettings


def _settings(window=32, sinks=4):
    return DepthKVSettings(policy="depthkv", budget=0.3, window=window, sinks=sinks, calibrate_at_start=True)


def test_plan_uses_the_calibrate_defaults_when_they_fit():
    plan = RC.plan_for(_settings(), logical_tokens=100_000, context_len=32_768, scorer="snapkv")
    assert (plan.context_tokens, plan.continuation_tokens, plan.samples) == (1024, 64, 2)
    assert plan.keep_fractions == (0.1, 0.2, 0.3, 0.5) and (plan.window, plan.sinks) == (32, 4)


@pytest.mark.parametrize("logical, ctx, expect", [(600, 32_768, 600 - 65), (100_000, 700, 700 - 65)])
def test_plan_shortens_the_context_to_what_the_server_holds(logical, ctx, expect):
    assert RC.plan_for(_settings(), logical, ctx, "snapkv").context_tokens == expect


def test_plan_refuses_a_pool_too_small_for_a_meaningful_calibration():
    with pytest.raises(DepthKVConfigError) as e:
        RC.plan_for(_settings(), logical_tokens=200, context_len=32_768, scorer="snapkv")
    assert str(e.value).startswith("--kv-profile: start-up calibration needs a context of >= 144 tokens")
    assert "--max-total-tokens" in str(e.value)
