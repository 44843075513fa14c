"""Counts, on CPU, the ops that would make the host wait for a CUDA device.

``SyncCounter`` is a ``TorchFunctionMode`` + ``TorchDispatchMode`` pair that follows which tensors
live on the *host* and which on the *device* as the code under test would run on a GPU, although
everything is a CPU tensor here:

- host: tensors the caller registers (SGLang's ``*_cpu`` batch fields), tensors made by a factory
  call without a ``device=`` argument (``torch.arange(n)``, ``torch.tensor(list)``), results of
  ``.cpu()`` / ``.numpy()``, and results of ops whose tensor inputs are all host;
- device: everything else (pool buffers, ``device=``-made tensors, ``.to(device)`` of a host tensor).
  ``.to(<cpu>)`` is read as "to the serving device": the plugin moves data to the host only with
  ``.cpu()`` / ``.tolist()``.

A *sync* is one of these with a device tensor as input: ``_local_scalar_dense`` (``.item()``,
``bool()``, ``int()``), ``nonzero``, ``unique``, ``masked_select``, indexing or ``index_put`` with a
boolean mask, ``repeat_interleave`` without ``output_size``, ``bincount``, ``equal``/``is_nonzero``,
a blocking ``copy_`` into a host tensor, and ``.tolist()`` / ``.numpy()`` / blocking ``.cpu()``.
Every aten op is counted too (``aten_ops``: the launch count a GPU would see, roughly).
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten

_SYNC_OPS = {
    aten._local_scalar_dense.default, aten.nonzero.default, aten._unique2.default, aten.unique_dim.default,
    aten.unique_consecutive.default, aten.masked_select.default, aten.bincount.default, aten.equal.default,
    aten.is_nonzero.default, aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor,
}
_BOOL_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
_FACTORIES = {torch.arange, torch.empty, torch.zeros, torch.ones, torch.full, torch.tensor, torch.as_tensor,
              torch.randn, torch.rand, torch.randint, torch.linspace, torch.eye}
_HOST_READS = {torch.Tensor.tolist, torch.Tensor.numpy}


def _tensors(obj):
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


class SyncCounter:
    """``with counter.tracking():`` follows host/device tags; ``with counter.count(path):`` also
    counts syncs and aten ops under ``path``."""

    def __init__(self):
        self.host = WeakIdKeyDictionary()
        self.syncs = Counter()
        self.ops = Counter()
        self.sync_kinds = {}
        self.path = None

    def mark_host(self, *tensors):
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self.host[t] = True

    def is_host(self, t) -> bool:
        return t in self.host

    def fresh_copy(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of ``t``, not counted (stands in for a cross-device copy that CPU torch skips)."""
        prev, self.path = self.path, None
        try:
            return t.clone()
        finally:
            self.path = prev

    def _sync(self, what: str):
        if self.path is not None:
            self.syncs[self.path] += 1
            kinds = self.sync_kinds.setdefault(self.path, Counter())
            kinds[what] += 1

    @contextmanager
    def tracking(self):
        with _FunctionMode(self), _DispatchMode(self):
            yield self

    @contextmanager
    def count(self, path: str):
        prev, self.path = self.path, path
        self.syncs[path] += 0
        self.ops[path] += 0
        try:
            yield
        finally:
            self.path = prev


class _FunctionMode(TorchFunctionMode):
    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.c = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.c
        ins = _tensors((args, kwargs))
        out = func(*args, **kwargs)
        if ins and out is ins[0] and self._crosses(func, args, kwargs, ins[0]):
            out = c.fresh_copy(out)  # on a GPU this is a new tensor on the other side
        if func in _HOST_READS:
            if ins and not c.is_host(ins[0]):
                c._sync(func.__name__)
            return out
        if func is torch.Tensor.cpu:
            if ins and not c.is_host(ins[0]) and not kwargs.get("non_blocking", False):
                c._sync("cpu")
            c.mark_host(out)
            return out
        outs = _tensors(out)
        if func in _FACTORIES and not ins:
            if kwargs.get("device") is None:
                c.mark_host(*outs)
            else:
                for t in outs:
                    c.host.pop(t, None)
        elif func in (torch.Tensor.to, torch.Tensor.cuda):
            dev = kwargs.get("device")
            if dev is None:
                dev = next((a for a in args[1:] if isinstance(a, (str, torch.device))), None)
            if dev is not None or func is torch.Tensor.cuda:
                for t in outs:
                    c.host.pop(t, None)
            elif ins and c.is_host(ins[0]):
                c.mark_host(*outs)
        return out


    def _crosses(self, func, args, kwargs, t) -> bool:
        if func is torch.Tensor.cpu:
            return not self.c.is_host(t)
        if func is torch.Tensor.cuda:
            return self.c.is_host(t)
        if func is torch.Tensor.to:
            dev = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
            return dev is not None and self.c.is_host(t)
        return False


class _DispatchMode(TorchDispatchMode):
    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.c = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.c
        ins = _tensors((args, kwargs))
        on_device = [t for t in ins if not c.is_host(t)]
        if c.path is not None:
            c.ops[c.path] += 1
            if on_device:
                if func in _SYNC_OPS and not (func.overloadpacket is aten.repeat_interleave
                                              and kwargs.get("output_size") is not None):
                    c._sync(str(func.overloadpacket.__name__))
                elif func in _BOOL_INDEX_OPS and any(
                        t.dtype in (torch.bool, torch.uint8) for t in _tensors(args[1:2])):
                    c._sync("bool_index")
                elif func is aten.copy_.default and c.is_host(args[0]) and not c.is_host(args[1]) \
                        and not (len(args) > 2 and args[2]) and not kwargs.get("non_blocking", False):
                    c._sync("copy_to_host")
        out = func(*args, **kwargs)
        if ins and not on_device:
            c.mark_host(*_tensors(out))
        return out
