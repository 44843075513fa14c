"""Which positions of a chunked prefill its request may prune at its final chunk.

SGLang inserts every intermediate chunk of a chunked prefill into the radix tree
(``cache_unfinished_req(chunked=True)``) and moves ``req.cache_protected_len`` past it. Those chunks
stay locked by the request until its prefill ends. The pruning rule of the plugin is "a token
segment is pruned once, by the request that inserted it, and never while another request holds
it", so at its final chunk a request prunes its **whole own prompt** ``[own_lo, n)``, where
``own_lo`` is where its own tokens begin:

- at the first chunk, ``own_lo = cache_protected_len`` (the radix-matched prefix belongs to
  whoever inserted it);
- ``note_chunk_insert``: when an intermediate chunk is inserted and the tree already held some of
  its tokens (another request inserted the same tokens meanwhile: SGLang frees the request's
  duplicates and rewrites its ``req_to_token`` row with the tree's ids), those positions are not
  the request's; ``own_lo`` moves past the last of them, so the own segment stays contiguous;
- ``unshared_start`` (final chunk): a tree node of the own segment that another running request
  has matched since (``lock_ref > 1``: it holds it) is never pruned; ``own_lo`` moves past the last
  such node.

Without sharing or duplicates (the usual case) the final chunk prunes exactly what a single
unchunked prefill of the same prompt prunes (``tests/sglang_e2e/test_reference_equivalence.py``
checks kept sets and tokens against the HF reference). With ``--disable-radix-cache`` (SGLang's
``ChunkCache``) chunks never enter a tree and ``cache_protected_len`` stays 0: the same result.

State lives on the ``Req`` (SGLang's ``Req`` has no ``__slots__``) under ``OWN_LO_ATTR`` from the
first chunk until the final chunk's entry is built.
"""

from __future__ import annotations

import torch

OWN_LO_ATTR = "_depthkv_chunk_own_lo"


def chunk_own_lo(req) -> int:
    """``own_lo`` of a request's current chunk (recorded at its first chunk)."""
    protected = int(req.cache_protected_len)
    own = getattr(req, OWN_LO_ATTR, None)
    if own is None:
        own = protected
        setattr(req, OWN_LO_ATTR, own)
    if own > protected:
        raise RuntimeError(f"request {req.rid}: chunk own_lo {own} beyond cache_protected_len {protected}")
    return int(own)


def forget(req) -> None:
    if hasattr(req, OWN_LO_ATTR):
        delattr(req, OWN_LO_ATTR)


def note_chunk_insert(req, row_before: torch.Tensor, lo: int, row_after: torch.Tensor) -> None:
    """After ``cache_unfinished_req``: ``row_before`` / ``row_after`` are the request's logical ids of
    positions ``lo ..`` before / after the insertion (``after`` up to the new ``cache_protected_len``).
    Positions whose ids changed were already in the tree (not the request's own tokens)."""
    own = getattr(req, OWN_LO_ATTR, None)
    if own is None:
        return
    n = int(row_after.numel())
    changed = torch.nonzero(row_before[:n].to(row_after.device) != row_after).reshape(-1)
    if changed.numel():
        setattr(req, OWN_LO_ATTR, max(int(own), int(lo) + int(changed[-1]) + 1))


def unshared_start(req, own_lo: int) -> int:
    """``own_lo`` raised past every tree node of ``[own_lo, cache_protected_len)`` that another
    request holds (``lock_ref > 1``; the request itself holds one lock on its path)."""
    end = int(req.cache_protected_len)
    node = getattr(req, "last_node", None)
    while end > own_lo and node is not None and getattr(node, "parent", None) is not None:
        if node.lock_ref > 1:
            return end
        end -= len(node.key)
        node = node.parent
    return int(own_lo)
