"""Host syncs on the plugin's hot paths (``benchmarks/hot_path``): counts, not times.

The counter is checked first on ops whose sync behaviour on CUDA is known, then every path of the
serving state at Llama-3.1-8B attention shapes is held to its target (decode and request finish:
none; an end-of-prefill batch: at most a few, whatever its size)."""

import pytest
import torch

from benchmarks.hot_path.run import count_paths
from benchmarks.hot_path.sync_count import SyncCounter
from sglang_depthkv.sglang import checks


def test_counter_tells_host_from_device():
    c = SyncCounter()
    with c.tracking():
        dev = torch.arange(6, device="cpu")
        host = torch.arange(6)
        with c.count("host"):
            host.tolist(), int(host[2]), host[host > 2], torch.nonzero(host)
        with c.count("device"):
            dev.tolist()  # 1
            int(dev[2])  # 2
            dev[dev > 2]  # 3: boolean mask
            torch.nonzero(dev)  # 4
            torch.unique(dev)  # 5
            bool((dev > 3).any())  # 6
            dev.cpu()  # 7
            torch.repeat_interleave(dev, dev)  # 8: output size read back
            torch.repeat_interleave(dev, dev, output_size=15)  # not a sync
            pinned = torch.empty(6, dtype=torch.int64)
            pinned.copy_(dev, non_blocking=True)  # not a sync
            pinned.copy_(dev)  # 9
            host.to("cpu")  # host -> device: not a sync
    assert c.syncs["host"] == 0
    assert c.syncs["device"] == 9, c.sync_kinds


@pytest.fixture(scope="module")
def counts():
    mp = pytest.MonkeyPatch()
    mp.setenv(checks.ENV, "0")  # production setting: content checks off
    try:
        return count_paths(batch=4)
    finally:
        mp.undo()


@pytest.mark.parametrize("path", ["decode_graph", "decode_eager", "request_finish"])
def test_decode_and_finish_never_wait_for_the_device(counts, path):
    syncs, kinds, ops = counts[path]
    assert ops > 0  # the path ran
    assert syncs == 0, kinds


@pytest.mark.parametrize("path", ["prefill_end", "prefill_end_laprox"])
def test_prefill_end_syncs_do_not_grow_with_layers_times_requests(counts, path):
    syncs, kinds, ops = counts[path]
    assert ops > 0
    assert syncs <= 8, kinds


def test_admission_reads_back_at_most_once(counts):
    syncs, kinds, _ = counts["admission"]
    assert syncs <= 1, kinds


def test_content_checks_do_sync(monkeypatch):
    """With ``SGLANG_DEPTHKV_CHECKS=1`` the checks read device values back: the counter sees them."""
    monkeypatch.setenv(checks.ENV, "1")
    got = count_paths(batch=2)
    assert got["decode_eager"][0] > 0
