"""Hook: the attention-backend factory returns the mapping-aware backend of the requested name
(``torch_native`` or ``triton``) under --kv-policy; any other name is refused by name."""

import logging

from sglang_depthkv.sglang.config import SUPPORTED_ATTENTION_BACKENDS, settings_of


def build_backend_around(orig, *args, **kwargs):
    runner = kwargs.get("model_runner")
    settings = settings_of(runner.server_args) if runner is not None else None
    if settings is None:
        return orig(*args, **kwargs)
    from sglang_depthkv.patches.registry import verify_applied

    verify_applied()
    name = kwargs.get("backend_str")
    if name not in SUPPORTED_ATTENTION_BACKENDS:
        raise ValueError(f"--attention-backend: {name!r} not supported with --kv-policy; "
                         f"supported: {', '.join(SUPPORTED_ATTENTION_BACKENDS)}")
    runner.init_new_workspace = kwargs.get("init_new_workspace", False)
    if name == "triton":
        from sglang_depthkv.sglang.backends.triton import DepthKVTritonAttnBackend as backend_cls
    else:
        from sglang_depthkv.sglang.backends.torch_native import DepthKVTorchNativeAttnBackend as backend_cls

    backend = backend_cls(runner)
    logging.getLogger("sglang_depthkv").info("sglang-depthkv: attention backend %s", type(backend).__name__)
    return backend
