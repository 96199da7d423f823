#!/usr/bin/env bash
# The benchmark, with one command, as root on a fresh Debian 12 machine or on the running test cluster:
#
#   bash tests/benchmarks/run.sh [--quick] [--reps N] [--scale N] [--window S] [--out DIR]
#
# Brings the test cluster up (idempotent), creates the benchmark users bench01..bench12, then measures
# (tests/benchmarks/bench.py --help for what). Prints a markdown table; writes it and every sample to
# tests/benchmarks/results/latest.{md,json}. Takes about 5 minutes (--quick: about 2).
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
exec /opt/spunnel/venv/bin/python "$here/bench.py" "$@"
