#!/usr/bin/env bash
# The Slurm backends side by side (the command line and pyslurm), on the test cluster running Slurm 25.11
# with pyslurm 25.11 built against it, as root:
#
#   bash tests/benchmarks/backends.sh [--reps N] [--window S] [--out DIR]
#
# Brings the cluster up on Slurm 25.11 (SPUNNEL_SLURM=25.11 tests/cluster/up.sh: builds it once, about 7
# minutes, cached after), creates the benchmark users, and runs tests/benchmarks/backends.py. Writes
# tests/benchmarks/results/backends.{md,json}. About 5 minutes after the build. Leaves the cluster on 25.11:
# `bash tests/cluster/up.sh` switches back to Debian's 22.05.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
SPUNNEL_SLURM=25.11 bash "$here/../cluster/up.sh"
bash "$here/users.sh"
exec /opt/spunnel/venv/bin/python "$here/backends.py" "$@"
