"""Site configuration shared by the CLI and the server extension.

Both read ``jupyter_spunnel_jupyter_config.{json,py}`` from Jupyter's config path (e.g.
/etc/jupyter, /usr/local/etc/jupyter, ~/.jupyter; see `jupyter --paths`), in Jupyter's order of
priority. The server extension reads it because it is the ExtensionApp's own config file; the CLI
reads it here. Example: /etc/jupyter/jupyter_spunnel_jupyter_config.json with
``{"SpunnelManager": {"partition": "interact", "mem": "4000", "time": "2:00:00"}}``.
"""

from __future__ import annotations

import logging

from traitlets import Bool, List, Unicode
from traitlets.config import Application, Config, Configurable

CONFIG_FILE = "jupyter_spunnel_jupyter_config"


def site_config_key(section: str, key: str) -> str:
    """``c.SECTION.KEY``, with the site config file that sets it (the one that wins), for errors
    that must blame the site's configuration rather than the user's options."""
    from jupyter_core.paths import jupyter_config_path

    name = f"c.{section}.{key}"
    where = ""
    try:
        for loaded, filename in Application._load_config_files(
            CONFIG_FILE, path=jupyter_config_path(), raise_config_file_errors=False
        ):
            if key in loaded.get(section, {}):
                where = filename
    except Exception:  # a config file that does not even load: the name alone still helps
        return name
    return f"{name} ({where})" if where else name


def load_site_config(log: logging.Logger | None = None) -> Config:
    from jupyter_core.paths import jupyter_config_path

    config = Config()
    for loaded, _filename in Application._load_config_files(
        CONFIG_FILE, path=jupyter_config_path(), log=log, raise_config_file_errors=True
    ):
        config.merge(loaded)
    return config


class PrivateTmp(Configurable):
    """A private /tmp and /var/tmp for Jupyter, its kernels and terminals on the node, as the
    private-tmpdir SPANK plugin gives (privatetmp.py), removed when the session ends."""

    enabled = Bool(
        True,
        config=True,
        help="""Give each session's Jupyter a private /tmp and /var/tmp (an unprivileged user and
        mount namespace; where the node refuses one, TMPDIR/TMP/TEMP point at the private
        directory instead). Left alone where the site already makes /tmp private per job.""",
    )
    base = Unicode(
        "",
        config=True,
        help="""Where the private directories go: BASE.JOB.RESTART/{tmp,var_tmp}, as the
        plugin's base=. Empty: inside the session's runtime directory on the node.""",
    )
    mounts = List(
        Unicode(),
        ["/var/tmp", "/tmp"],  # noqa: S108 (mount points, as the plugin's mount=)
        config=True,
        help="The directories made private (/tmp is always mounted last).",
    )

    def settings(self) -> tuple[bool, str, tuple[str, ...]]:
        return self.enabled, self.base, tuple(self.mounts)
