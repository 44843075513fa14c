"""Start-up patch for the decode-step host-time benchmark (on ``PYTHONPATH`` of the Engine's
processes; ``benchmarks/hot_path/decode_step.py``): during decode forwards the interpreted Triton
kernels are launched but their bodies skipped (this CPU interprets them; a GPU runs them
asynchronously, so only their launch is host work), and the start time of every decode forward of
a full batch is appended to ``$HOT_PATH_STEP_LOG``. Prefill forwards run their kernels (the
plugin scores and prunes real K/V there). A skipped kernel leaves its output uninitialised, so
denormals are flushed to zero in the model's process: their CPU arithmetic penalty would otherwise
make either side's step time depend on garbage values."""

import importlib.abc
import importlib.util
import os
import sys
import time

TARGETS = ("sglang.srt.model_executor.model_runner", "triton.runtime.interpreter")
_state = {"decode": False}


def _patch_runner(module):
    import torch

    torch.set_flush_denormal(True)
    cls = module.ModelRunner
    forward = cls.forward

    def timed_forward(self, forward_batch, *args, **kwargs):
        decode = forward_batch.forward_mode.is_decode()
        if decode and forward_batch.batch_size == int(os.environ.get("HOT_PATH_BATCH", "0")):
            with open(os.environ["HOT_PATH_STEP_LOG"], "a") as f:
                f.write(f"{time.perf_counter()}\n")
        _state["decode"] = decode
        try:
            return forward(self, forward_batch, *args, **kwargs)
        finally:
            _state["decode"] = False

    cls.forward = timed_forward


def _patch_interpreter(module):
    cls = module.InterpretedFunction
    run = cls.run

    def maybe_run(self, *args, **kwargs):
        if _state["decode"]:
            return None
        return run(self, *args, **kwargs)

    cls.run = maybe_run


class _AfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in TARGETS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        exec_module = spec.loader.exec_module
        patch = _patch_runner if name == TARGETS[0] else _patch_interpreter

        def run(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = run
        return spec


sys.meta_path.insert(0, _AfterImport())
