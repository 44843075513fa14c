"""RULER-style accuracy harness: task generators, the sweep runner, the report."""
