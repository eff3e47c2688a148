"""rankd node agent: supervises the local ranks of distributed jobs and serves them over gRPC."""

__version__ = "0.1.0"
