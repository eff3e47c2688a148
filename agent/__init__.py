"""rankd node agent: supervises the local ranks of distributed jobs and serves them over gRPC."""

from rankd import __version__

__all__ = ["__version__"]
