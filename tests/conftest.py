"""Test-wide settings: CPU environment for SGLang/Triton, and the kvpress import shim."""
import os
import sys
import types

os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("SGLANG_DEPTHKV_CHECKS", "1")  # content checks on the serving path (sglang/checks.py)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def import_kvpress():
    """Import kvpress (installed --no-deps): its package __init__ imports `datasets` for DuoAttention
    only, which we do not install; a placeholder module stands in for that one import."""
    if "datasets" not in sys.modules:
        try:
            import datasets  # noqa: F401
        except ImportError:
            placeholder = types.ModuleType("datasets")
            placeholder.load_dataset = None
            sys.modules["datasets"] = placeholder
    import kvpress

    return kvpress


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
