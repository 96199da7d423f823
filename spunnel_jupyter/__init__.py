"""spunnel-jupyter: Jupyter on a Slurm compute node through an ssh tunnel."""

__version__ = "0.1.0"
