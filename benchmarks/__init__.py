"""Latency and accuracy benchmarks, metrics and dataset layouts (no PyTorch needed)."""
