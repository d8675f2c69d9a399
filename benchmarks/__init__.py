"""anoclip.benchmarks."""
