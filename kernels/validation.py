"""Shared input checks for the kernels: every failure is a ``ValueError`` naming the argument.

Two levels, documented per function:
- *metadata checks* (always): ranks, shapes, dtypes, devices, contiguity, host-side integers. No
  device synchronisation.
- *content checks* (``validate=True``): ranges and orderings of ids held in tensors (slots,
  positions, indptr monotonicity...). These are cheap torch reductions but read device values back
  (one synchronisation per call); pass ``validate=False`` on hot paths once the caller is trusted
  (e.g. inside CUDA-graph capture).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

INDEX_DTYPES = (torch.int32, torch.int64)
KV_DTYPES = (
    torch.bfloat16,
    torch.float16,
    torch.float32,
    torch.uint8,  # fp8 stored as bytes, SGLang's store_dtype
    torch.float8_e4m3fn,
    torch.float8_e5m2,
)
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_tensor(
    name: str,
    t,
    *,
    dim: Optional[int] = None,
    dtypes: Optional[Iterable[torch.dtype]] = None,
    device: Optional[torch.device] = None,
    contiguous: bool = False,
    shape: Optional[Sequence[Optional[int]]] = None,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise ValueError(f"{name} has dtype {t.dtype}, expected one of {[str(d) for d in dtypes]}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if shape is not None:
        if len(shape) != t.dim() or any(s is not None and s != ts for s, ts in zip(shape, t.shape)):
            want = tuple("*" if s is None else s for s in shape)
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {want}")
    return t


def check_row_major(name: str, t: torch.Tensor) -> None:
    """2-D tensors read with a row stride: the last dimension must be unit-stride."""
    if t.dim() >= 1 and t.numel() > 0 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a unit stride in its last dimension, got strides {t.stride()}")


def check_positive_int(name: str, v, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def check_range(name: str, t: torch.Tensor, lo: int, hi: int) -> None:
    """Content check: every element in [lo, hi)."""
    if t.numel() == 0:
        return
    mn, mx = int(t.min()), int(t.max())
    if mn < lo or mx >= hi:
        raise ValueError(f"{name} has values in [{mn}, {mx}], allowed [{lo}, {hi - 1}]")


def check_batch_metadata(req_to_token, req_pool_indices, seq_lens, device, validate: bool, max_seq_len: Optional[int] = None):
    """The SGLang batch triple: ``req_to_token[R, W]``, ``req_pool_indices[bs]``, ``seq_lens[bs]``."""
    check_tensor("req_to_token", req_to_token, dim=2, dtypes=INDEX_DTYPES, device=device)
    check_row_major("req_to_token", req_to_token)
    check_tensor("req_pool_indices", req_pool_indices, dim=1, dtypes=INDEX_DTYPES, device=device, contiguous=True)
    bs = req_pool_indices.shape[0]
    check_tensor("seq_lens", seq_lens, dtypes=INDEX_DTYPES, device=device, contiguous=True, shape=(bs,))
    if max_seq_len is not None:
        check_positive_int("max_seq_len", max_seq_len, 0)
        if max_seq_len > req_to_token.shape[1]:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds req_to_token width {req_to_token.shape[1]}")
    if validate and bs > 0:
        check_range("req_pool_indices", req_pool_indices, 0, req_to_token.shape[0])
        hi = (max_seq_len if max_seq_len is not None else req_to_token.shape[1]) + 1
        check_range("seq_lens", seq_lens, 0, hi)
    return bs


def gather_request_ids(req_to_token, req_pool_indices, seq_lens) -> list:
    """Content helper (syncs): per request, the logical ids ``req_to_token[r, :len]`` as int64."""
    rows = req_pool_indices.long().tolist()
    lens = seq_lens.long().tolist()
    return [req_to_token[r, :n].long() for r, n in zip(rows, lens)]


def check_ids_in_mapping(ids_per_req, mapping_width: int) -> None:
    for b, ids in enumerate(ids_per_req):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= mapping_width):
            raise ValueError(
                f"request {b}: req_to_token holds logical ids in [{int(ids.min())}, {int(ids.max())}], "
                f"outside the mapping width {mapping_width}"
            )
