"""The soak's requests: seeded random prompt lengths, shared prefixes + random suffixes, random
``max_new_tokens`` (``ignore_eos``), and a share of requests aborted mid-stream or while queued.

Modes:

- ``plain``: one non-streamed ``/generate``; must return exactly ``max_new_tokens`` ids, finish
  reason ``length``.
- ``stream``: streamed; the same check on the last chunk (every chunk extends the previous one).
- ``abort_close``: streamed; the client closes the connection after ``abort_after`` chunks (SGLang
  0.5.17 aborts a disconnected stream from the response's background task, 2 s later).
- ``abort_api``: streamed; after ``abort_after`` chunks the client posts ``/abort_request`` with the
  rid and reads the stream to its end (finish reason ``abort``, or ``length`` if it finished first).
- ``abort_queued``: non-streamed; ``/abort_request`` is posted ``abort_after`` milliseconds after the
  request was sent, usually while it still waits in the queue.
- ``overlong``: non-streamed, a prompt at or above the server's input limit (under ``--kv-policy``
  the smallest layer's capacity, ``patches/request_limits.py``); must be refused at once with
  SGLang's ``Input length ... exceeds the maximum allowed length`` error (HTTP 400).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

ABORT_MODES = ("abort_close", "abort_api", "abort_queued")
MODES = ("plain", "stream") + ABORT_MODES + ("overlong",)


@dataclass(frozen=True)
class SoakRequest:
    rid: str  # fixed width: SGLang's /abort_request aborts every rid that *starts with* the one given
    input_ids: Tuple[int, ...]
    max_new_tokens: int
    mode: str
    abort_after: int  # chunks (abort_close / abort_api) or milliseconds (abort_queued); 0 otherwise
    prefix: int  # index of the shared prefix used, -1 for none
    prefix_len: int  # tokens taken from that prefix

    @property
    def aborts(self) -> bool:
        return self.mode in ABORT_MODES

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("input_ids")
        d["prompt_len"] = len(self.input_ids)
        return d


def _check_range(name: str, lo: int, hi: int, floor: int) -> None:
    if not (floor <= lo <= hi):
        raise ValueError(f"{name}: need {floor} <= min <= max, got {lo}..{hi}")


def build_workload(n: int, prompt_len: Tuple[int, int], new_tokens: Tuple[int, int], vocab_size: int, *,
                   seed: int = 0, n_prefixes: int = 8, share_frac: float = 0.75, stream_frac: float = 0.25,
                   abort_frac: float = 0.1, min_abort_new_tokens: int = 16,
                   token_range: Optional[Tuple[int, int]] = None) -> List[SoakRequest]:
    """``n`` requests, deterministic in ``seed``. Prompt lengths are uniform in ``prompt_len``; a
    fraction ``share_frac`` of them starts with the first 25-90 % of one of ``n_prefixes`` shared
    random prefixes (so the radix tree branches at many depths); token ids are uniform in
    ``token_range`` (default ``[1, vocab_size - 1]``)."""
    if n < 1:
        raise ValueError(f"--requests must be >= 1, got {n}")
    _check_range("--prompt-len", *prompt_len, 1)
    _check_range("--new-tokens", *new_tokens, 1)
    for name, v in (("--share-frac", share_frac), ("--stream-frac", stream_frac), ("--abort-frac", abort_frac)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v}")
    if stream_frac + abort_frac > 1.0:
        raise ValueError(f"--stream-frac {stream_frac} + --abort-frac {abort_frac} exceed 1")
    if n_prefixes < 1:
        raise ValueError(f"--prefixes must be >= 1, got {n_prefixes}")
    lo_tok, hi_tok = token_range if token_range is not None else (1, vocab_size - 1)
    if not (0 <= lo_tok <= hi_tok < vocab_size):
        raise ValueError(f"token range {lo_tok}..{hi_tok} outside the vocabulary [0, {vocab_size})")
    rng = random.Random(seed)
    prefixes = [[rng.randint(lo_tok, hi_tok) for _ in range(prompt_len[1])] for _ in range(n_prefixes)]
    abort_new = (max(new_tokens[0], min_abort_new_tokens), max(new_tokens[1], min_abort_new_tokens))
    out = []
    for i in range(n):
        length = rng.randint(*prompt_len)
        prefix, plen = -1, 0
        if rng.random() < share_frac:
            prefix = rng.randrange(n_prefixes)
            plen = min(length - 1, int(round(length * rng.uniform(0.25, 0.9))))
            if plen <= 0:
                prefix, plen = -1, 0
        ids = (prefixes[prefix][:plen] if prefix >= 0 else []) + [rng.randint(lo_tok, hi_tok) for _ in range(length - plen)]
        u = rng.random()
        if u < abort_frac:
            mode = ABORT_MODES[rng.randrange(len(ABORT_MODES))]
            max_new = rng.randint(*abort_new)
            abort_after = rng.randint(0, 500) if mode == "abort_queued" else rng.randint(1, 3)
        else:
            mode = "stream" if u < abort_frac + stream_frac else "plain"
            max_new = rng.randint(*new_tokens)
            abort_after = 0
        out.append(SoakRequest(f"soak{seed}-{i:07d}", tuple(ids), max_new, mode, abort_after, prefix, plen))
    return out


def overlong_requests(n: int, input_limit: int, max_prompt: int, vocab_size: int, seed: int = 0) -> List[SoakRequest]:
    """``n`` requests whose prompts (``input_limit`` .. ``max_prompt`` tokens) the server must refuse."""
    if n and not (1 <= input_limit <= max_prompt):
        raise ValueError(f"overlong prompts need 1 <= input limit {input_limit} <= {max_prompt}")
    rng = random.Random(seed + 2)
    return [SoakRequest(f"soak{seed}-x{i:06d}", tuple(rng.randint(1, vocab_size - 1)
                                                      for _ in range(rng.randint(input_limit, max_prompt))),
                        8, "overlong", 0, -1, 0) for i in range(n)]
