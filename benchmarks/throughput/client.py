"""Run SGLang's own benchmark client, ``sglang.benchmark.serving`` (``python -m sglang.bench_serving``),
with the arguments given on the command line.

``sglang.benchmark.datasets`` imports Hugging Face ``datasets`` at module level for its MMMU loader
only. The GPU bundle ships ``datasets``; the CPU environment does not (it pulls pyarrow). When it is
missing, a placeholder module stands in whose ``load_dataset`` raises, so the offline datasets used
here (``random-ids``, ``generated-shared-prefix``) run and any dataset that would download fails
loudly.

    python benchmarks/throughput/client.py --backend sglang --base-url URL --dataset-name random-ids ...
"""

import sys
import types


def _install_datasets_placeholder() -> None:
    try:
        import datasets  # noqa: F401
    except ImportError:
        mod = types.ModuleType("datasets")

        def load_dataset(*args, **kwargs):
            raise RuntimeError("the Hugging Face `datasets` package is not installed here; only offline "
                               "datasets (random-ids, generated-shared-prefix) can be benchmarked")

        mod.load_dataset = load_dataset
        sys.modules["datasets"] = mod


def main() -> None:
    _install_datasets_placeholder()
    from sglang.benchmark.serving import cli_main

    cli_main()


if __name__ == "__main__":
    main()
