"""Attention backends whose KV reads go through ``DepthKVPool``'s per-layer mapping."""
