"""pysnell benchmarks: micro-benchmarks, baselines and a comparison runner (python -m benchmarks)."""
