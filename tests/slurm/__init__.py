"""A real Slurm for the tests: munged, slurmctld and a slurmd per node on this host.

`slurm.cluster.SlurmCluster.start` runs them as root from a temp dir; `skip_reason`
says why they cannot run here. `python tests/slurm/cluster.py DIR` keeps one up by hand.
"""
