"""spunnel-jupyter: Jupyter on a Slurm compute node through an ssh tunnel."""

from __future__ import annotations

__version__ = "0.1.0"


def _jupyter_server_extension_points() -> list[dict[str, object]]:
    from .extension import SpunnelExtension  # lazy: the CLI must not import jupyter_server

    return [{"module": "spunnel_jupyter", "app": SpunnelExtension}]


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    # The JupyterLab extension built from labextension/ (wheels install it as shared data; this
    # is for `jupyter labextension develop`).
    return [{"src": "labextension", "dest": "spunnel-jupyter"}]
