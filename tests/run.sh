#!/usr/bin/env bash
# Set up everything (packages, the real test cluster, the Python environment) and run the whole test
# suite against it. Run as root on a Debian 12 machine: bash tests/run.sh [pytest args]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bash "$here/cluster/up.sh"
cd "$here/.."
exec /opt/spunnel/venv/bin/python -m pytest -p no:cacheprovider "$@"
