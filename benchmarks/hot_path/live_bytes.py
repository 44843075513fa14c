"""Peak bytes of tensor storage alive while a block runs (``LiveBytes``, a ``TorchDispatchMode``):
every new storage an op creates (one that is none of its inputs') is counted until its last reference dies (a weak finalizer on the
storage), so views and in-place results cost nothing and freed transients stop counting."""

from __future__ import annotations

import weakref

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import torch


class LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = {}
        self.current = 0
        self.peak = 0

    def _release(self, ptr: int) -> None:
        self.current -= self.live.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            ptr, n = st.data_ptr(), st.nbytes()
            if n == 0 or ptr in self.live or ptr in inputs:  # a view or an in-place result: not new
                continue
            self.live[ptr] = n
            self.current += n
            self.peak = max(self.peak, self.current)
            weakref.finalize(st, self._release, ptr)
        return out
