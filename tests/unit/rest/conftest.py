"""pytest-jupyter's fixtures and hooks (jp_fetch, an in-process Jupyter server, coroutine tests),
for this directory only.

pytest accepts ``pytest_plugins`` only in a top-level conftest, and this directory also runs in
``pytest tests`` and ``pytest tests/unit``. Importing the plugin's names here registers its
fixtures and hooks as this conftest's own, which pytest scopes to the tests below it: the rest of
the suite never sees pytest-jupyter's autouse fixtures.
"""

from pytest_jupyter.jupyter_server import *  # noqa: F403
