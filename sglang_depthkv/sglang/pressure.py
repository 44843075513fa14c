"""Counters of per-layer memory pressure in this scheduler process, for soak runs and their reports
(written into the ``SGLANG_DEPTHKV_INVARIANT_LOG`` lines as ``pressure``).

- ``admission_rounds_lowered`` / ``max_admission_deficit``: prefill rounds (``PrefillAdder``) whose
  token budget a layer lowered below SGLang's logical one, and the largest such deficit;
- ``evictions`` / ``evicted_tokens`` / ``evicted_slots``: tree evictions on SGLang's allocation path
  (``evict_from_tree_cache``, incl. the per-layer top-up), logical tokens and per-layer slots freed;
- ``decode_refusals``: decode steps that fit SGLang's logical pool but not some layer (SGLang then
  retracts).

Plain integers, updated by the hooks in ``patches/admission.py`` and ``patches/evict.py``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List


@dataclass
class PressureCounters:
    admission_rounds_lowered: int = 0
    max_admission_deficit: int = 0
    evictions: int = 0
    evicted_tokens: int = 0
    evicted_slots: List[int] = field(default_factory=list)
    decode_refusals: int = 0

    def note_admission(self, deficit: int) -> None:
        if deficit > 0:
            self.admission_rounds_lowered += 1
            self.max_admission_deficit = max(self.max_admission_deficit, int(deficit))

    def note_eviction(self, free_before: List[int], free_after: List[int], logical_before: int,
                      logical_after: int) -> None:
        if logical_after <= logical_before:
            return
        if len(self.evicted_slots) != len(free_before):
            self.evicted_slots = [0] * len(free_before)
        self.evictions += 1
        self.evicted_tokens += logical_after - logical_before
        self.evicted_slots = [s + a - b for s, a, b in zip(self.evicted_slots, free_after, free_before)]

    def note_decode_refusal(self) -> None:
        self.decode_refusals += 1

    def as_dict(self) -> dict:
        return asdict(self)


COUNTERS = PressureCounters()
