"""Package data: public-domain haystack text (Jane Austen, extracted by benchmarks/data/extract_austen.py)."""
