#!/usr/bin/env bash
# Create the benchmark users bench01..bench12 exactly as tests/cluster/up.sh creates alice and bob
# (tests/cluster/add-users.sh), and check they reach the node. Idempotent; run as root. The benchmark never uses
# alice or bob: other test runs SIGKILL every process of those two between their tests.
set -Eeuo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
[[ $(id -u) -eq 0 ]] || { echo "users: must run as root" >&2; exit 1; }

COUNT=${SPUNNEL_BENCH_USERS:-12}
mapfile -t names < <(for i in $(seq 1 "$COUNT"); do printf 'bench%02d\n' "$i"; done)
bash "$(dirname "$0")/../cluster/add-users.sh" "${names[@]}"
# Each user can reach the node without a password (what the tunnel needs).
for i in 1 "$COUNT"; do
    u=$(printf 'bench%02d' "$i")
    out=$(cd / && runuser -u "$u" -- timeout 20 ssh -o BatchMode=yes c1 hostname 2>&1) ||
        { echo "users: ssh c1 as $u failed: $out" >&2; exit 1; }
    [[ $out == c1 ]] || { echo "users: ssh c1 as $u printed '$out'" >&2; exit 1; }
done
echo "users: bench01..$(printf 'bench%02d' "$COUNT") ready"
