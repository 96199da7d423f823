"""Fake Slurm, ssh and Jupyter executables for the cluster-free tests (see fakebin.py)."""
