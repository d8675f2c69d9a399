"""Camera streams: sources, capture threads, the inference pipeline and its sinks (``anoclip stream``)."""

from .events import FrameEvent, Sink
from .pipeline import StreamOptions, StreamPipeline
from .sources import SourceSpec, parse_source

__all__ = ["FrameEvent", "Sink", "StreamOptions", "StreamPipeline", "SourceSpec", "parse_source"]
