"""SGLang plugin entry point (group ``sglang.srt.plugins``): registers the named hooks."""


def register() -> None:
    """Called by SGLang's plugin loader in every process that loads plugins."""
    # Hooks are registered here by SGLang integration I (issue 6).
    return None
