"""rankd's benchmarks, side by side with torch elastic: ``python -m bench.run``.

Every scenario runs rankd (real ``rankd-agent`` processes over loopback gRPC) and torch's
``torch.distributed.elastic.multiprocessing`` in the same process run, alternating, and
reports medians and their ratio against the targets of issue 7.
"""
