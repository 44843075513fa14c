"""Test-only start-up patch (on ``PYTHONPATH`` of an Engine subprocess, so every spawned SGLang
process loads it): eager decode batches of ``DepthKVTritonAttnBackend`` go through its CUDA-graph
buffers, as graph replays would. The first batch of a size binds the metadata the way SGLang's
capture does (``init_forward_metadata_out_graph(..., in_capture=True)``); later batches of that size
only refill the buffers in place (replay-prep) and reuse the binding, and the writes read the
prepared write slots. No graph is captured (CPU); the plugin itself has no such switch."""

import importlib.abc
import importlib.util
import sys

TARGET = "sglang_depthkv.sglang.backends.triton"


def _patch(module):
    cls = module.DepthKVTritonAttnBackend
    orig_init, orig_meta = cls.__init__, cls.init_forward_metadata

    def __init__(self, model_runner):
        orig_init(self, model_runner)
        size = self.req_to_token_pool.size
        self.init_cuda_graph_state(size, size)
        self._test_bindings = {}

    def init_forward_metadata(self, fb):
        if not fb.forward_mode.is_decode() or fb.spec_info is not None:
            return orig_meta(self, fb)
        self.streams.check_held(fb.out_cache_loc, "the decoded token")
        bs = fb.batch_size
        bound = self._test_bindings.get(bs)
        if bound is None:
            self.init_forward_metadata_out_graph(fb, in_capture=True)
            self._test_bindings[bs] = (self.forward_metadata, self._layer_streams)
        else:
            self.init_forward_metadata_out_graph(fb)
            self.forward_metadata, self._layer_streams = bound
        self.token_to_kv_pool.read_write_slots = True

    cls.__init__, cls.init_forward_metadata = __init__, init_forward_metadata


class _AfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def run(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = run
        return spec


sys.meta_path.insert(0, _AfterImport())
