"""The Jupyter server extension: the same sessions as ``spunnel-notebook``, driven from JupyterLab.

It makes one ``SessionHub`` (hub.py) over the shared ``SpunnelManager`` and serves the REST API
(handlers.py).

Sessions started here are torn down when this Jupyter server stops, by the same rules as a Ctrl-C in
the terminal: a session is owned by exactly one supervisor, and one that outlived its server would
keep an allocation running with nobody able to see its URL in JupyterLab.
"""

from __future__ import annotations

from jupyter_server.extension.application import ExtensionApp

from .handlers import handlers
from .hub import SessionHub
from .manager import SpunnelManager


class SpunnelExtension(ExtensionApp):
    """Start, watch, open and stop a compute-node notebook from JupyterLab."""

    name = "spunnel_jupyter"  # config file: jupyter_spunnel_jupyter_config.{json,py}
    load_other_extensions = True

    def initialize_settings(self) -> None:
        manager = SpunnelManager(parent=self, log=self.log)
        self.hub = SessionHub(manager)
        self.settings["spunnel_hub"] = self.hub

    def initialize_handlers(self) -> None:
        self.handlers.extend(handlers())

    async def stop_extension(self) -> None:
        await self.hub.shutdown()
