"""anoclip.runtime."""
