"""The plugin's per-layer serving paths with every tensor on ``meta`` (a device without values), under
``OneDevice``: a tensor made on the host and met with device tensors fails here as it would on CUDA.
Covered: ``DepthKVPool`` (writes through the mapping and through the CUDA-graph write slots),
``DepthKVAllocator`` (alloc / prune / free as batched device ops), the end-of-prefill held counts
and held positions by scatter compaction, ``dropped_positions`` / ``apply_prune``. Triton launches
and the allocator's host-count snapshot need values and are not part of it (the snapshot is a
non-blocking copy into pinned host memory, by design the one host-side tensor)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from device_modes import OneDevice  # noqa: E402

from sglang_depthkv.sglang import checks  # noqa: E402
from sglang_depthkv.sglang.allocator import DepthKVAllocator  # noqa: E402
from sglang_depthkv.sglang.backends.scoring import DepthKVScoringMixin, held_counts_of  # noqa: E402
from sglang_depthkv.sglang.pool import DepthKVPool  # noqa: E402
from sglang_depthkv.sglang.pruning import PruneRecord, apply_prune, dropped_positions  # noqa: E402

META = torch.device("meta")
CAPS = (40, 20, 30)


@pytest.fixture
def meta_state(monkeypatch):
    monkeypatch.setenv(checks.ENV, "0")  # content checks read values
    pool = DepthKVPool(40, list(CAPS), torch.bfloat16, 2, 8, len(CAPS), META)
    alloc = DepthKVAllocator(40, torch.bfloat16, META, pool)
    monkeypatch.setattr(alloc, "_queue_snapshot", lambda: None)  # a meta tensor has no value to copy out
    return pool, alloc


def test_alloc_prune_free_and_writes_stay_on_the_device(meta_state):
    pool, alloc = meta_state
    with OneDevice():
        ids = alloc.alloc(12)
        assert ids.device == META and alloc.mapping.device == META
        k = torch.zeros(12, 2, 8, dtype=torch.bfloat16, device=META)
        pool.set_kv_buffer(None, ids, k, k, layer_id_override=1)
        pool.alloc_write_slots(16)
        pool.fill_write_slots(ids, 12)
        pool.read_write_slots = True
        pool.set_kv_buffer(None, ids, k, k, layer_id_override=2)
        freed = alloc.prune("all", [ids[:3], ids[2:4], ids[5:9]])
        assert freed == [3, 2, 4]
        alloc.free(ids)
    assert alloc.layer_available_sizes()[0] <= CAPS[0]  # host counts: a lower bound after a free


def test_end_of_prefill_host_facts_and_prune_stay_on_the_device(meta_state, monkeypatch):
    pool, alloc = meta_state
    r2t = torch.zeros((4, 64), dtype=torch.int32, device=META)
    with OneDevice():
        ids = alloc.alloc(20)
        r2t[1, :20] = ids.to(torch.int32)
        with monkeypatch.context() as m:  # the one host read of the batch: meta has no values to read
            m.setattr(torch.Tensor, "tolist", lambda self: [[20] * len(CAPS)])
            assert held_counts_of(alloc, r2t, [1], [20]) == [[20] * len(CAPS)]

        class Host(DepthKVScoringMixin):
            pass

        h = Host()
        h.token_to_kv_pool, h.req_to_token_pool = pool, type("R", (), {"req_to_token": r2t})()
        kpos, slots = h._held(1, 1, 20, count=20)
        assert kpos.device == META and slots.device == META and kpos.shape == (20,)
        keep = torch.arange(4, 12, device=META)
        drop = dropped_positions(keep, 4, 20)
        assert drop.device == META and drop.shape == (8,)
        rec = PruneRecord(rid="r", own_lo=4, seq_len=20, keep=[keep] * len(CAPS))
        apply_prune(alloc, r2t, 1, rec)
        assert rec.freed == [8] * len(CAPS)
