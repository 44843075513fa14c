"""DepthKV calibration through SGLang's own model runner, on the serving device (start-up
auto-calibration, ``patches/auto_calibration.py``).

The same measurement as ``python -m sglang_depthkv calibrate`` (``core/calibrate.py``: prune one
layer at a time at each keep fraction, mean KL of the teacher-forced continuation's next-token
distributions against the full cache), with the model, the KV pool and the attention backend SGLang
built for serving instead of the HF reference model:

1. the context is prefilled as an SGLang extend batch (``ScheduleBatch`` → ``ForwardBatch``, as
   SGLang's ``one_batch`` benchmark drives a runner by hand); the backend's in-forward scoring
   (``scoring.DepthKVScoringMixin``, the observations the pruning path builds) hands the per-layer
   token scores to ``score_observer`` instead of pruning;
2. the continuation is one extend batch over that prefix, run once over the full cache and once per
   (layer, fraction) with only that layer's mapping row narrowed to the kept positions (the pool's
   slots stay allocated; the row is restored afterwards). Logits for every continuation position
   come from the model body's final hidden states times the LM head (vocabulary rows only, in the
   weights' dtype), upcast to float32 for the KL.

The keep sets and the KL loop are ``core.calibrate``'s (``keep_sets_from_scores``,
``sensitivity_table``). It runs on a provisional full-cache pool (``--kv-policy full`` sizes),
which the caller frees before sizing the real one. One progress line per layer, with an ETA.
"""

from __future__ import annotations

import logging
import time
from array import array
from dataclasses import dataclass
from types import SimpleNamespace
from typing import List, Optional

import torch

logger = logging.getLogger("sglang_depthkv")

# What start-up calibration measures: ``python -m sglang_depthkv calibrate``'s defaults.
KEEP_FRACTIONS = (0.1, 0.2, 0.3, 0.5)
CONTEXT_TOKENS = 1024
CONTINUATION_TOKENS = 64
SAMPLES = 2
NOVEL = "pride"  # core.haystack.CALIBRATION_NOVELS: never a task haystack


@dataclass(frozen=True)
class RunnerCalibrationPlan:
    keep_fractions: tuple
    context_tokens: int
    continuation_tokens: int
    samples: int
    scorer: str
    window: int
    sinks: int


def plan_for(settings, logical_tokens: int, context_len: int, scorer: str) -> RunnerCalibrationPlan:
    """The calibration this server can run: ``CONTEXT_TOKENS`` of context, fewer when the provisional
    pool (``logical_tokens``) or the model's context length holds less; refused when the context left
    is shorter than four times the protected tokens (sinks + window)."""
    from sglang_depthkv.sglang.config import DepthKVConfigError

    n = min(CONTEXT_TOKENS, int(logical_tokens) - CONTINUATION_TOKENS - 1, int(context_len) - CONTINUATION_TOKENS - 1)
    protected = settings.sinks + settings.window
    if n < 4 * protected:
        raise DepthKVConfigError("--kv-profile", f"start-up calibration needs a context of >= {4 * protected} tokens "
                                 f"(4 x (--kv-sinks + --kv-window)) + {CONTINUATION_TOKENS}, and this server holds "
                                 f"{logical_tokens} tokens with a context length of {context_len}; raise "
                                 "--max-total-tokens, or calibrate offline and pass --kv-profile")
    return RunnerCalibrationPlan(KEEP_FRACTIONS, n, CONTINUATION_TOKENS, SAMPLES, scorer, settings.window, settings.sinks)


def calibration_tokens(runner, vocab_size: int, plan: RunnerCalibrationPlan):
    """The packaged calibration novel as token ids, and the tokenizer's name for the profile record:
    the server's tokenizer, or UTF-8 bytes under ``--skip-tokenizer-init`` (a vocabulary of >= 256)."""
    from sglang_depthkv.core.haystack import haystack_text

    text = haystack_text([NOVEL])
    sa = runner.server_args
    need = plan.samples * (plan.context_tokens + plan.continuation_tokens)
    if getattr(sa, "skip_tokenizer_init", False):
        if vocab_size < 256:
            raise ValueError(f"--skip-tokenizer-init: start-up calibration feeds UTF-8 bytes as token ids, which needs "
                             f"a vocabulary of >= 256, the model has {vocab_size}; pass --kv-profile")
        return torch.tensor(list(text.encode("utf-8")[: need]), dtype=torch.int64), "bytes"
    from sglang.srt.utils.hf_transformers_utils import get_tokenizer

    tok = get_tokenizer(sa.tokenizer_path, tokenizer_mode=sa.tokenizer_mode,
                        trust_remote_code=bool(sa.trust_remote_code), revision=sa.revision)
    ids = tok(text[: need * 16], add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64), "auto"


class _NoTreeCache(SimpleNamespace):
    """The tree-cache stand-in SGLang's ``one_batch`` benchmark gives ``ScheduleBatch``: allocation
    only, no prefix matching (nothing here is shared between requests)."""

    def supports_swa(self) -> bool:
        return False

    def supports_mamba(self) -> bool:
        return False

    def is_chunk_cache(self) -> bool:
        return False

    def is_tree_cache(self) -> bool:
        return True

    def evict(self, params):
        pass


class RunnerForwards:
    """Extend forwards through ``runner.model`` over the runner's (provisional) pool and attention
    backend, outside SGLang's scheduler."""

    def __init__(self, runner):
        self.runner = runner
        self.backend = runner.attn_backend
        self.pool = runner.token_to_kv_pool
        self.start_layer = int(self.pool.start_layer)
        self.num_layers = int(self.pool.layer_num)
        self.vocab_size = int(runner.model_config.vocab_size)
        weight = getattr(runner.model.lm_head, "weight", None)
        if weight is None or not weight.is_floating_point() or weight.dim() != 2:
            raise ValueError("--kv-profile: start-up calibration reads the LM head as a float [vocab, hidden] "
                             "matrix, which this model's is not; run `python -m sglang_depthkv calibrate` and pass "
                             "--kv-profile")
        self.lm_head = weight[: self.vocab_size]
        self._tree = _NoTreeCache(page_size=1, device=runner.device,
                                  token_to_kv_pool_allocator=runner.token_to_kv_pool_allocator)

    def _batch(self, reqs):
        from sglang.srt.managers.schedule_batch import ScheduleBatch
        from sglang.srt.model_executor.forward_batch_info import ForwardBatch
        from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

        r = self.runner
        batch = ScheduleBatch.init_new(reqs=reqs, req_to_token_pool=r.req_to_token_pool,
                                       token_to_kv_pool_allocator=r.token_to_kv_pool_allocator, tree_cache=self._tree,
                                       model_config=r.model_config, enable_overlap=False,
                                       spec_algorithm=SpeculativeAlgorithm.NONE)
        batch.prepare_for_extend()
        if batch.input_ids is None and getattr(batch, "prefill_input_ids_cpu", None) is not None:
            batch.input_ids = batch.prefill_input_ids_cpu.to(batch.device, non_blocking=True)
            batch.prefill_input_ids_cpu = None
        fb = ForwardBatch.init_new(batch, r, return_hidden_states_before_norm=False)
        return batch, fb

    def _hidden(self, fb) -> torch.Tensor:
        from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

        with forward_context(ForwardContext(attn_backend=self.backend)):
            self.backend.init_forward_metadata(fb)
            out = self.runner.model.model(fb.input_ids, fb.positions, fb)
        if not isinstance(out, torch.Tensor):
            raise RuntimeError(f"start-up calibration: the model body returned {type(out).__name__}, not hidden states")
        return out

    def prefill_scores(self, req, plan: RunnerCalibrationPlan) -> torch.Tensor:
        """Prefill ``req`` (its prompt is the context); ``[L, n]`` raw token scores from the backend's
        in-forward scoring with the calibration scorer (no pruning)."""
        from sglang_depthkv.core.budgets import UniformAllocator
        from sglang_depthkv.core.policy import PrunePolicy
        from sglang_depthkv.core.scorers import profile_scorer
        from sglang_depthkv.sglang.observations import entries_for_batch

        batch, fb = self._batch([req])
        # the backend scores with the policy's scorer / sinks / window; its budget (< 1: "prunes") and
        # allocator are never used, as the observer takes the scores before any keep decision
        policy = PrunePolicy("calibration", profile_scorer(plan.scorer), UniformAllocator(), 0.5, plan.sinks,
                             plan.window)
        seen: List[torch.Tensor] = []
        self.runner.depthkv_pending_entries = entries_for_batch(batch)
        self.backend.policy, self.backend.score_observer = policy, lambda own: seen.extend(own.values())
        try:
            self._hidden(fb)
        finally:
            self.backend.policy = self.backend.score_observer = None
        if len(seen) != 1:
            raise RuntimeError(f"start-up calibration: the prefill produced {len(seen)} score tables, expected 1")
        return seen[0]

    def continuation(self, req, context_len: int, continuation: torch.Tensor):
        """The continuation as one extend batch over ``req``'s cached context; returns the batch and
        ``logits(layer, keep)``: ``[T, V]`` float32 logits of the continuation with layer ``layer``
        holding only the context positions ``keep`` (``layer`` None: the full cache)."""
        req_to_token = self.runner.req_to_token_pool.req_to_token
        req.prefix_indices = req_to_token[req.req_pool_idx, :context_len].to(torch.int64)
        req.full_untruncated_fill_ids.extend(int(t) for t in continuation.tolist())
        req.logprob_start_len = -1
        req.set_extend_range(context_len, context_len + int(continuation.numel()))
        batch, fb = self._batch([req])
        ctx_ids = req.prefix_indices.to(self.pool.mapping.device).long()

        def logits(layer: Optional[int], keep: Optional[torch.Tensor] = None) -> torch.Tensor:
            row = None
            if layer is not None:  # mapping rows and keep sets are both indexed by the pool's local layer
                row = self.pool.mapping[layer, ctx_ids].clone()
                drop = torch.ones(context_len, dtype=torch.bool, device=ctx_ids.device)
                drop[keep.to(ctx_ids.device)] = False
                self.pool.mapping[layer, ctx_ids[drop]] = 0
            try:
                h = self._hidden(fb)
            finally:
                if row is not None:
                    self.pool.mapping[layer, ctx_ids] = row
            # in the weights' dtype, as SGLang's logits processor computes them (no float32 copy of the
            # LM head: 2 GiB for Llama-3.1-8B, next to a pool that fills the device)
            return (h.to(self.lm_head.dtype) @ self.lm_head.T).float()

        return batch, logits

    def release(self, batch, req) -> None:
        """Free the sample's tokens and request row (the next sample starts from an empty pool)."""
        n = len(req.full_untruncated_fill_ids)
        ids = self.runner.req_to_token_pool.req_to_token[req.req_pool_idx, :n]
        self.runner.token_to_kv_pool_allocator.free(ids.to(torch.int64))
        self.runner.req_to_token_pool.free(req)


def _new_req(rid: str, context: torch.Tensor):
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    ids = array("q", [int(t) for t in context.tolist()])
    req = Req(rid=rid, origin_input_text="", origin_input_ids=ids,
              sampling_params=SamplingParams(temperature=0, max_new_tokens=1))
    req.full_untruncated_fill_ids = array("q", ids)
    req.logprob_start_len = -1
    req.set_extend_range(0, len(ids))
    return req


def calibrate_with_runner(runner, plan: RunnerCalibrationPlan, tokens: torch.Tensor):
    """``core.calibrate.CalibrationResult`` measured through ``runner`` (see the module docstring)."""
    from sglang_depthkv.core.calibrate import (CalibrationResult, calibration_settings, check_fractions,
                                               keep_sets_from_scores, sensitivity_table, token_samples)
    from sglang_depthkv.core.scorers import profile_scorer

    fractions = check_fractions(plan.keep_fractions)
    fw = RunnerForwards(runner)
    pairs = token_samples(tokens, plan.context_tokens, plan.continuation_tokens, plan.samples)
    L, total = fw.num_layers, len(pairs) * fw.num_layers
    t0 = time.monotonic()
    per = []
    with torch.no_grad():
        for s, (context, cont) in enumerate(pairs):
            req = _new_req(f"depthkv-calibration-{s}", context)
            scores = fw.prefill_scores(req, plan)
            keeps = keep_sets_from_scores(list(scores), plan.context_tokens, fractions, plan.sinks, plan.window)
            batch, logits = fw.continuation(req, plan.context_tokens, cont)
            full = logits(None)

            def progress(l, s=s):
                done = s * L + l + 1
                spent = time.monotonic() - t0
                logger.info("sglang-depthkv: calibrating sample %d/%d layer %d/%d (%d keep fractions): %.1f s, "
                            "ETA %.0f s", s + 1, len(pairs), l + 1, L, len(fractions), spent,
                            spent / done * (total - done))

            per.append(sensitivity_table(keeps, plan.context_tokens, full, logits, on_layer=progress))
            fw.release(batch, req)
    sens = torch.stack(per).mean(0)
    settings = calibration_settings(plan.samples, plan.context_tokens, plan.continuation_tokens, plan.window,
                                    plan.sinks, profile_scorer(plan.scorer))
    return CalibrationResult(fractions, sens, per, settings), time.monotonic() - t0
