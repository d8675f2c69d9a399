"""anoclip.export."""
