#!/usr/bin/env bash
# Set up everything (packages, the real test cluster, the Python environment) and run the whole test
# suite against it. Run as root on a Debian 12 machine: bash tests/run.sh [pytest args]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bash "$here/cluster/up.sh"
cd "$here/.."
venv=/opt/spunnel/venv/bin
# Lint and types first: cheap, and a failure here is as real as a failing test.
"$venv/ruff" check --no-cache .
"$venv/ruff" format --no-cache --check .
"$venv/mypy" --no-incremental spunnel_jupyter
# The JupyterLab extension: eslint, prettier and tsc, then its unit tests (npm ci if node_modules is stale).
[[ labextension/node_modules/.package-lock.json -nt labextension/package-lock.json ]] || (cd labextension && npm ci)
(cd labextension && npm run --silent lint && npm test --silent)
exec "$venv/python" -m pytest -p no:cacheprovider "$@"
