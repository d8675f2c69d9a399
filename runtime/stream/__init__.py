"""The inspection pipeline: sources, capture threads, inference and sinks. ``anoclip stream`` runs it
on cameras, network streams, videos and images; ``anoclip predict`` on its finite inputs."""

from .events import FrameEvent, Sink
from .pipeline import StreamOptions, StreamPipeline
from .sources import SourceSpec, parse_source

__all__ = ["FrameEvent", "Sink", "StreamOptions", "StreamPipeline", "SourceSpec", "parse_source"]
