"""Latency: ``anoclip bench``, the visual-tower, TTA, class-count and CPU-runtime latency scripts,
metric timing."""
