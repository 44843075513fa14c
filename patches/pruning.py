"""Hook: ``ForwardBatch.init_new`` (AFTER). Under a pruning ``--kv-policy``, builds one
``observations.ExtendEntry`` per request of an extend batch (prefix / sequence lengths, where its
own tokens begin (``chunk_ownership``), and whether its prefill ends in this batch: every request
except the batch's ``chunked_req``; mixed-in decode requests get ``None``) and hands them to the
attention backend as ``model_runner.depthkv_pending_entries``, which the backend claims in
``init_forward_metadata`` (SGLang's eager runner re-packs the ForwardBatch before the forward,
``dataclasses.replace`` / static buffers, so attributes set on it here would be lost).
Non-extend batches clear it (``None``); decode batches hand their ``Req`` list over as
``model_runner.depthkv_pending_decode_reqs`` (decode-time pruning state lives on the Req)."""

from sglang_depthkv.sglang.config import settings_of


def forward_batch_init_new_after(result, cls, batch, model_runner, *args, **kwargs):
    settings = settings_of(model_runner.server_args)
    if settings is None or not settings.prunes or result is None or getattr(model_runner, "is_draft_worker", False):
        return result
    if not batch.forward_mode.is_extend():
        model_runner.depthkv_pending_entries = None
        # decode-time pruning (--kv-decode-interval) keeps per-request state on the Req objects
        model_runner.depthkv_pending_decode_reqs = list(batch.reqs) if batch.forward_mode.is_decode() else None
        return result
    from sglang_depthkv.sglang.observations import entries_for_batch

    model_runner.depthkv_pending_entries = entries_for_batch(batch)
    return result
