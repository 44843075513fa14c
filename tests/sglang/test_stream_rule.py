"""The stream rule the allocator relies on under SGLang's overlap scheduler (docs: "Overlap
scheduler"): the fences of the pinned SGLang's event loop, read from its source, so an SGLang
change that drops one fails here instead of racing on a GPU."""

import inspect
import re


def _src(obj):
    return inspect.getsource(obj)


def test_forward_waits_for_the_schedule_stream_before_launch():
    from sglang.srt.managers.scheduler import Scheduler

    src = _src(Scheduler)
    assert "self.forward_stream.wait_stream(self.schedule_stream)" in src


def test_schedule_stream_waits_for_the_forward_after_each_launch_on_cuda():
    from sglang.srt.managers.scheduler import Scheduler

    src = _src(Scheduler)
    assert re.search(r"batch_result = self\.run_batch\(batch\)\s*\n(\s*#.*\n)*\s*self\._apply_war_barrier\(\)", src)
    barrier = _src(Scheduler._apply_war_barrier)
    assert "self.schedule_stream.wait_event(ev)" in barrier
    assert "self.schedule_stream.wait_stream(self.forward_stream)" in barrier
    assert re.search(r"self\._war_barrier_enabled = is_cuda\(\)", src)


def test_decode_graph_read_done_is_recorded_after_replay_prep():
    """The decode-time prunes run in ``load_batch`` (replay-prep): the read-done event the schedule
    stream waits for must be recorded after it."""
    from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner

    src = _src(DecodeCudaGraphRunner)
    load = src.index("self.load_batch(forward_batch, pp_proxy_tensors)")
    record = src.index("self.model_runner.war_fastpath_read_done_event = read_done", load)
    replay = src.index("self.backend.replay(", load)
    assert load < record < replay
