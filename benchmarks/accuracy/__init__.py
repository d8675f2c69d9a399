"""Accuracy on MVTec AD / VisA layouts: metrics, dataset loaders, synthetic sets, the 22 views, ``anoclip eval``."""
