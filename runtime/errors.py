"""Errors a user can cause. Each message names the cause and the fix in one line."""

from __future__ import annotations


class AnoclipError(Exception):
    """A problem with the user's input or environment, reported as one line with a nonzero exit."""

    exit_code = 1


class ArtifactError(AnoclipError):
    """Artifacts are missing, damaged or do not belong together."""


class UnknownClassError(AnoclipError):
    """The requested class has no prompt embeddings in the weights file."""


class ImageError(AnoclipError):
    """An image could not be read or decoded."""


class BackendError(AnoclipError):
    """An inference backend is unavailable or failed to load a model."""
