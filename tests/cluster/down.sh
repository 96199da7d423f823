#!/usr/bin/env bash
# Tear down the test cluster that up.sh stood up: first the second login host (login2.sh --down), then
# cancel the test users' jobs, stop exactly the daemons up.sh recorded in /run/spunnel-test/*.pid, remove the
# c1 namespace and veth pair, and the /etc/hosts and /etc/ssh/ssh_known_hosts lines marked "# spunnel-test".
# Packages, users, keys, configs and the venv stay, so up.sh brings everything back quickly. Run as root; safe
# to run when nothing is up.
set -Eeuo pipefail

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export LC_ALL=C

readonly RUN=/run/spunnel-test
readonly NS=c1 LOGIN_IF=spn-login
readonly MARK='# spunnel-test'
readonly USERS=(alice bob carol)

say() { printf 'down: %s\n' "$*"; }
warn() { printf 'down: WARNING: %s\n' "$*" >&2; }
trap 'printf "down: FAILED (exit %s) at line %s: %s\n" "$?" "$LINENO" "$BASH_COMMAND" >&2' ERR

[[ $(id -u) -eq 0 ]] || { echo "down: must run as root" >&2; exit 1; }
T0=$(date +%s%N)

# shellcheck source=tests/cluster/pidfiles.sh
source "$(dirname "$0")/pidfiles.sh"

# TERM the given pids, KILL whatever is left after SECONDS.
terminate() {
    local secs=$1 pid i left
    shift
    (($#)) || return 0
    kill -TERM "$@" 2>/dev/null || true
    for ((i = 0; i < secs * 10; i++)); do
        left=0
        for pid in "$@"; do
            if [[ -d /proc/$pid ]] && ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null; then
                left=1
            fi
        done
        ((left)) || return 0
        sleep 0.1
    done
    warn "still running after ${secs}s, sending SIGKILL: $*"
    kill -KILL "$@" 2>/dev/null || true
}

# 0. The second login host (its user's jobs, its sshd and processes, namespaces, routes, marked lines): before
# c1 goes, whose route back to login2 it removes.
bash "$(dirname "$0")/login2.sh" --down || warn "login2.sh --down failed"

# 1. Jobs first, while the controller and slurmd still run, so job steps end cleanly.
if [[ -r $RUN/slurmctld.pid ]] && timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; then
    present=()
    for u in "${USERS[@]}"; do
        getent passwd "$u" >/dev/null || continue
        present+=("$u")
        timeout 10 scancel --full -u "$u" || warn "scancel --full -u $u failed"
    done
    users=$(IFS=,; echo "${present[*]}")
    for ((i = 0; i < 150 && ${#present[@]}; i++)); do
        [[ -z $(timeout 5 squeue -h -u "$users" -o %i 2>/dev/null) ]] && break
        sleep 0.1
    done
    if ((${#present[@]})); then
        left=$(timeout 5 squeue -h -u "$users" -o '%i %u %T' 2>/dev/null || true)
        [[ -z $left ]] || warn "jobs still listed after 15 s: $(echo "$left" | tr '\n' ';')"
    fi
fi

# descendants_of PID: every live process below PID, parents before children.
descendants_of() {
    local f s pid ppid
    local -A kids=()
    for f in /proc/[0-9]*/stat; do
        s=$(cat "$f" 2>/dev/null) || continue
        pid=${s%% *}
        s=${s##*) }
        read -r _ ppid _ <<<"$s"
        kids[$ppid]+=" $pid"
    done
    local queue=("$1") p
    while ((${#queue[@]})); do
        p=${queue[0]}
        queue=("${queue[@]:1}")
        for pid in ${kids[$p]:-}; do
            echo "$pid"
            queue+=("$pid")
        done
    done
}

# 2. The daemons up.sh started, in reverse order. An sshd's sessions and whatever users run in them go with
# it: killing only the session processes would orphan their commands, which ssh does not hang up.
for name in sshd-login sshd-c1 slurmd slurmctld munged; do
    if pid=$(recorded_pid "$name"); then
        pids=("$pid")
        if [[ $name == sshd-* ]]; then
            mapfile -t -O 1 pids < <(descendants_of "$pid")
        fi
        terminate 10 "${pids[@]}"
        say "stopped $name (pid $pid${pids[1]:+ and $((${#pids[@]} - 1)) session processes})"
    fi
    rm -f "$RUN/$name.pid"
done

# 3. Whatever still runs inside c1's network namespace belongs to the test node (leftover job steps, user
# processes that escaped their job, ssh sessions): end it, or it would keep the namespace alive.
if [[ -e /run/netns/$NS ]]; then
    ns="net:[$(stat -L -c %i "/run/netns/$NS")]"
    stragglers=()
    for d in /proc/[0-9]*; do
        if [[ $(readlink "$d/ns/net" 2>/dev/null) == "$ns" ]]; then stragglers+=("${d#/proc/}"); fi
    done
    if ((${#stragglers[@]})); then
        warn "ending processes left in namespace $NS: $(for p in "${stragglers[@]}"; do
            printf '%s(%s) ' "$p" "$(cat "/proc/$p/comm" 2>/dev/null)"; done)"
        terminate 5 "${stragglers[@]}"
    fi
fi

# 4. Network
if ip link show "$LOGIN_IF" >/dev/null 2>&1; then
    ip link del "$LOGIN_IF"
    say "deleted veth $LOGIN_IF"
fi
if [[ -e /run/netns/$NS ]]; then
    ip netns del "$NS"
    say "deleted network namespace $NS"
fi

# 5. Marked lines; rewritten in place (no rename) so a bind-mounted /etc/hosts works too.
for f in /etc/hosts /etc/ssh/ssh_known_hosts; do
    if [[ ! -f $f ]] || ! grep -q -- " $MARK\$" "$f"; then continue; fi
    kept=$(grep -v -- " $MARK\$" "$f" || true)
    if [[ -n $kept ]]; then printf '%s\n' "$kept" >"$f"; else : >"$f"; fi
    say "removed test lines from $f"
done

rm -rf "$RUN"
say "done in $(awk -v a="$T0" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }') s (packages, users, /etc/spunnel-test and /opt/spunnel kept)"
