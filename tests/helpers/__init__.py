"""Helpers shared by rankd's tests (imported as ``helpers.<module>``; tests/ is on sys.path
through its conftest):

- ``wait``: the deadline waits, the one way a test waits for something to happen;
- ``agents``: real ``rankd-agent`` processes on loopback, started through ``rankd.testing``;
- ``core``: a Supervisor over ``tmp_path`` for the tests of the agent's core;
- ``torchjobs``: torch worker scripts and the torchrun environment keys;
- ``slurm``: a real single-host Slurm cluster for the Slurm tests.
"""
