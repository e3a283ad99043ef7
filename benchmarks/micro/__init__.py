"""pytest-benchmark micro-benchmarks: `pytest benchmarks/micro --benchmark-only` (not part of `pytest tests`)."""
