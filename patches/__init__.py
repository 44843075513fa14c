"""SGLang plugin entry point (group ``sglang.srt.plugins``): registers the named hooks.

Every hook is a pass-through unless ``--kv-policy`` / ``kv_policy=`` is set (``ServerArgs`` then
carries ``_depthkv_settings``). The list of hooks is ``registry.HOOKS``.
"""


def register() -> None:
    """Called by SGLang's plugin loader in every process that loads plugins."""
    from sglang_depthkv.patches.registry import register_all

    register_all()
