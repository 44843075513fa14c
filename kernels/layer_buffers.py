"""``LayerKVBuffers``: per-layer K/V buffers with different slot counts, as device pointer tables.

SGLang keeps one ``[slots, kv_heads, head_dim]`` tensor per layer (NHD, page_size 1). With ragged
per-layer capacity the slot counts differ, so a kernel that covers all layers in one launch cannot
take a single stacked tensor; like SGLang's ``MHATokenToKVPool._init_data_ptrs_and_strides`` we pass
an int64 tensor of data pointers (one per layer) and the kernel casts
``tl.load(ptrs + l).to(tl.pointer_type(dtype))``. This works under ``TRITON_INTERPRET=1`` as well
(tested), so there is no separate stacked-buffer code path: ``from_stacked`` just takes views.

The object keeps references to the tensors so the pointers stay valid; rebuild it if a buffer is
reallocated. Rows are copied bit-for-bit as 1/2/4-byte integers, so fp8 (``torch.uint8`` store dtype
or ``torch.float8_e4m3fn``/``e5m2``), bf16, fp16 and fp32 all work.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import triton.language as tl

from .validation import KV_DTYPES, check_tensor

_BIT_TYPES = {1: tl.uint8, 2: tl.int16, 4: tl.int32}


def bitcopy_type(dtype: torch.dtype):
    """Triton integer type with the element size of ``dtype`` (rows are copied bit-exactly)."""
    size = torch.empty((), dtype=dtype).element_size()
    if size not in _BIT_TYPES:
        raise ValueError(f"unsupported KV element size {size} bytes ({dtype})")
    return _BIT_TYPES[size]


class LayerKVBuffers:
    """K and V buffers of ``L`` layers: ``k[l]``, ``v[l]`` are contiguous ``[slots_l, H, D]``.

    Attributes: ``k_ptrs``/``v_ptrs`` int64 ``[L]`` on the buffers' device; ``slots`` (python list)
    and ``slots_t`` (int64 ``[L]``, device) slot counts; ``num_heads``, ``head_dim``, ``dtype``.
    Requirements (ValueError otherwise): same number of K and V layers (>= 1), every buffer 3-D and
    contiguous, one dtype among bf16/fp16/fp32/uint8/fp8, one device, the same ``H`` and ``D`` for
    every layer and for K and V.
    """

    def __init__(self, k: Sequence[torch.Tensor], v: Sequence[torch.Tensor]):
        k, v = list(k), list(v)
        if len(k) == 0 or len(k) != len(v):
            raise ValueError(f"LayerKVBuffers: need the same non-zero number of K and V layers, got {len(k)} and {len(v)}")
        first = k[0]
        check_tensor("k[0]", first, dim=3, dtypes=KV_DTYPES, contiguous=True)
        for name, bufs in (("k", k), ("v", v)):
            for l, t in enumerate(bufs):
                check_tensor(f"{name}[{l}]", t, dim=3, dtypes=(first.dtype,), device=first.device, contiguous=True)
                if tuple(t.shape[1:]) != tuple(first.shape[1:]):
                    raise ValueError(
                        f"{name}[{l}] has [H, D] = {tuple(t.shape[1:])}, expected {tuple(first.shape[1:])} like k[0]"
                    )
                if t.shape[0] < 1:
                    raise ValueError(f"{name}[{l}] has no slots (slot 0 is the dummy slot and must exist)")
        for l in range(len(k)):
            if k[l].shape[0] != v[l].shape[0]:
                raise ValueError(f"layer {l}: k has {k[l].shape[0]} slots but v has {v[l].shape[0]}")
        self.k: List[torch.Tensor] = k
        self.v: List[torch.Tensor] = v
        self.num_layers = len(k)
        self.num_heads = int(first.shape[1])
        self.head_dim = int(first.shape[2])
        self.dtype = first.dtype
        self.device = first.device
        self.slots = [int(t.shape[0]) for t in k]
        self.k_ptrs = torch.tensor([t.data_ptr() for t in k], dtype=torch.int64, device=self.device)
        self.v_ptrs = torch.tensor([t.data_ptr() for t in v], dtype=torch.int64, device=self.device)
        self.slots_t = torch.tensor(self.slots, dtype=torch.int64, device=self.device)

    @classmethod
    def from_stacked(cls, k: torch.Tensor, v: torch.Tensor) -> "LayerKVBuffers":
        """From stacked ``[L, slots, H, D]`` tensors (every layer with the same slot count)."""
        check_tensor("k", k, dim=4, dtypes=KV_DTYPES, contiguous=True)
        check_tensor("v", v, dim=4, dtypes=(k.dtype,), device=k.device, contiguous=True, shape=tuple(k.shape))
        return cls(list(k.unbind(0)), list(v.unbind(0)))

    @property
    def row_elems(self) -> int:
        return self.num_heads * self.head_dim

    def same_storage_as(self, other: "LayerKVBuffers") -> List[bool]:
        """Per layer: do ``self`` and ``other`` share storage (same tensor or views of one storage)?"""
        def st(t):
            return t.untyped_storage().data_ptr()

        return [
            bool({st(self.k[l]), st(self.v[l])} & {st(other.k[l]), st(other.v[l])})
            for l in range(self.num_layers)
        ]
