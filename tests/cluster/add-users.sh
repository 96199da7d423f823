#!/usr/bin/env bash
# Create test users as the cluster's tests need them (idempotent; root): add-users.sh USER...
# Each gets a home, password '*' (sshd with UsePAM no refuses even key logins for a locked '!'
# password), its own ed25519 key in ~/.ssh with itself in authorized_keys, and private modes.
# Used by up.sh (alice, bob) and by the benchmark (bench01..bench12).
set -Eeuo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
[[ $(id -u) -eq 0 ]] || { echo "add-users: must run as root" >&2; exit 1; }
for u in "$@"; do
    getent passwd "$u" >/dev/null || useradd -m -s /bin/bash "$u"
    [[ $(getent shadow "$u" | cut -d: -f2) == '*' ]] || usermod -p '*' "$u"
    home=$(getent passwd "$u" | cut -d: -f6)
    install -d -o "$u" -g "$u" -m 0700 "$home/.ssh"
    if [[ ! -s $home/.ssh/id_ed25519 || ! -s $home/.ssh/id_ed25519.pub ]]; then
        rm -f "$home/.ssh/id_ed25519" "$home/.ssh/id_ed25519.pub"
        (cd / && runuser -u "$u" -- ssh-keygen -q -t ed25519 -N '' -C "$u@spunnel-test" -f "$home/.ssh/id_ed25519")
    fi
    pub=$(cat "$home/.ssh/id_ed25519.pub")
    touch "$home/.ssh/authorized_keys"
    grep -qxF -- "$pub" "$home/.ssh/authorized_keys" || printf '%s\n' "$pub" >>"$home/.ssh/authorized_keys"
    chown "$u:$u" "$home/.ssh/authorized_keys" "$home/.ssh/id_ed25519" "$home/.ssh/id_ed25519.pub"
    chmod 0600 "$home/.ssh/authorized_keys" "$home/.ssh/id_ed25519"
    chmod go-w "$home"
done
