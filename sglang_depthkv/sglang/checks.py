"""The switch for content checks on the serving path (``SGLANG_DEPTHKV_CHECKS=1``).

Content checks read device values back (a CUDA host sync each): that every new token holds a slot
at every layer, that a pruned id is held, unique and in range. Off by default, so the hot path never
waits for the GPU; the test suite turns them on (``tests/conftest.py``), and a user chasing a bug
can too. Shape, dtype and host-side checks always run.
"""

from __future__ import annotations

import os

ENV = "SGLANG_DEPTHKV_CHECKS"


def enabled() -> bool:
    return os.environ.get(ENV, "0") == "1"
