"""Latency: ``anoclip bench``, the visual-tower and TTA latency scripts, metric timing."""
