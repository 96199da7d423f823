#!/usr/bin/env bash
# The benchmark, with one command, as root on a fresh Debian 12 machine or on the running test cluster:
#
#   bash tests/benchmarks/run.sh [--quick] [--reps N] [--scale N] [--window S] [--out DIR]
#
# Brings the test cluster up (idempotent), creates the benchmark users bench01..bench12, then measures
# (tests/benchmarks/bench.py --help for what). Prints a markdown table; writes it and every sample to
# tests/benchmarks/results/latest.{md,json}. Takes about 8 minutes (--quick: about 3).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# up.sh checks the cluster as the test user alice; a concurrent test run that kills alice's jobs can fail
# that check, so try it again before giving up.
for attempt in 1 2 3; do
    bash "$here/../cluster/up.sh" && break
    ((attempt < 3)) || exit 1
    echo "run: up.sh failed (attempt $attempt), retrying in 5 s" >&2
    sleep 5
done
bash "$here/users.sh"
# jupyter-forward (NCAR's, PyPI), the peer measured side by side: its own venv, from Debian's Python
# (readable by the benchmark users). 2022.9.10: the latest, 2025.1.16, cannot run without a conda env
# (results/peers-jupyter-forward-2025.1.16.txt).
peers=/opt/spunnel/peers-venv
if [[ ! -x $peers/bin/jupyter-forward ]]; then
    rm -rf "$peers"
    /usr/bin/python3 -m venv "$peers"
    "$peers/bin/pip" install --quiet jupyter-forward==2022.9.10
    chmod -R a+rX "$peers"
fi
exec /opt/spunnel/venv/bin/python "$here/bench.py" "$@"
