"""Test helper: ``OneDevice``, a dispatch mode that refuses an op whose tensor arguments are on more
than one device. On ``meta`` a CPU tensor indexed by a meta index silently returns CPU (CUDA raises),
so meta runs of the serving code go through it to catch device mixing on CPU."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class OneDevice(TorchDispatchMode):
    """A 0-dim CPU tensor is a scalar to torch and allowed."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat, _ = tree_flatten((args, kwargs or {}))
        scalar = lambda t: t.dim() == 0 and t.device.type == "cpu"
        devices = {t.device for t in flat if isinstance(t, torch.Tensor) and not scalar(t)}
        if len(devices) > 1:
            raise RuntimeError(f"{func} mixes devices {sorted(map(str, devices))}")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def one_device():
    with OneDevice():
        yield


@pytest.fixture
def no_value_guards(monkeypatch, one_device):
    """Meta tensors have no values: the NaN guard (which reads them) does nothing in meta runs."""
    from sglang_depthkv.core import selection

    monkeypatch.setattr(selection, "check_no_nan", lambda scores, what: None)
