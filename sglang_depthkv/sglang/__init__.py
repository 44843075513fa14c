"""SGLang-side pieces: per-layer pool, allocator, radix cache, attention backends, scoring hooks."""
