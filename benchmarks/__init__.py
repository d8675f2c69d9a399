"""Benchmarks (no PyTorch needed): ``accuracy`` (metrics, dataset layouts, Tables 1 and 2),
``latency`` (ms per image per stage and backend, Table 7) and ``paper`` (the published figures)."""
