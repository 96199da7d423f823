#!/usr/bin/env bash
# Create the benchmark users bench01..bench12 exactly as tests/cluster/up.sh creates alice and bob: a home,
# password '*' (sshd with UsePAM no refuses key logins for a locked '!' password), their own ed25519 key in
# ~/.ssh with itself in authorized_keys, private modes. Idempotent; run as root. The benchmark never uses
# alice or bob: other test runs SIGKILL every process of those two between their tests.
set -Eeuo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
[[ $(id -u) -eq 0 ]] || { echo "users: must run as root" >&2; exit 1; }

COUNT=${SPUNNEL_BENCH_USERS:-12}
for i in $(seq 1 "$COUNT"); do
    u=$(printf 'bench%02d' "$i")
    getent passwd "$u" >/dev/null || useradd -m -s /bin/bash "$u"
    [[ $(getent shadow "$u" | cut -d: -f2) == '*' ]] || usermod -p '*' "$u"
    home=$(getent passwd "$u" | cut -d: -f6)
    install -d -o "$u" -g "$u" -m 0700 "$home/.ssh"
    if [[ ! -s $home/.ssh/id_ed25519 || ! -s $home/.ssh/id_ed25519.pub ]]; then
        rm -f "$home/.ssh/id_ed25519" "$home/.ssh/id_ed25519.pub"
        (cd / && runuser -u "$u" -- ssh-keygen -q -t ed25519 -N '' -C "$u@spunnel-bench" -f "$home/.ssh/id_ed25519")
    fi
    pub=$(cat "$home/.ssh/id_ed25519.pub")
    touch "$home/.ssh/authorized_keys"
    grep -qxF -- "$pub" "$home/.ssh/authorized_keys" || printf '%s\n' "$pub" >>"$home/.ssh/authorized_keys"
    chown "$u:$u" "$home/.ssh/authorized_keys" "$home/.ssh/id_ed25519" "$home/.ssh/id_ed25519.pub"
    chmod 0600 "$home/.ssh/authorized_keys" "$home/.ssh/id_ed25519"
    chmod go-w "$home"
done
# Each user can reach the node without a password (what the tunnel needs).
for i in 1 "$COUNT"; do
    u=$(printf 'bench%02d' "$i")
    out=$(cd / && runuser -u "$u" -- timeout 20 ssh -o BatchMode=yes c1 hostname 2>&1) ||
        { echo "users: ssh c1 as $u failed: $out" >&2; exit 1; }
    [[ $out == c1 ]] || { echo "users: ssh c1 as $u printed '$out'" >&2; exit 1; }
done
echo "users: bench01..$(printf 'bench%02d' "$COUNT") ready"
