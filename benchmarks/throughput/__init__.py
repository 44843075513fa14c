"""Parts of the serving-throughput benchmark (``python -m benchmarks.serving``): presets and
workloads, the files a run needs (tokenizer, DepthKV profile, tiny model config), equal-bytes
capacity pins, server-log parsing, the decode bandwidth bound, the run loop, the report and plots."""
