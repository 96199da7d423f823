#!/usr/bin/env bash
# A second login host, "login2", for the test cluster that up.sh stands up (issue 11: a session started on
# one login host is attached to from another). up.sh runs this at its end; it also runs alone.
#
#   login2: network namespace "login2" (10.200.1.2 on spn-l2; the root namespace's end is spn-r-l2,
#       10.200.1.1), its own UTS namespace (hostname login2) and its own MOUNT namespace, in which /tmp is a
#       private tmpfs: spunnel's host-local state (/tmp/spunnel-jupyter-UID) is not the first host's, as on
#       real separate hosts. /home, /opt, /etc, /run (munge's socket), Slurm's binaries and slurm.conf stay
#       shared, with one exception: login2 sees its own /etc/jupyter/jupyter_spunnel_jupyter_config.json
#       (reverse_host = login2; the shared one names the first host), bind-mounted over the shared file.
#   routing: login2 <-> root namespace <-> c1. The root namespace forwards, but only between its two veths
#       (per-interface IPv4 forwarding on spn-login and spn-r-l2, the global switch stays off); login2 has a
#       route to 10.200.0.0/24 and c1 one back to 10.200.1.0/24, both through the root namespace. So srun on
#       login2 reaches slurmctld (10.200.0.1) and slurmd on c1 connects back to srun's ports on login2.
#   sshd: its own, in all three namespaces, on 10.200.1.2:22 with its own host key; `login2` is in
#       /etc/hosts and /etc/ssh/ssh_known_hosts (lines marked "# spunnel-test:login2"), so ssh from the
#       first host and from c1 (a node dialling back for `ssh -R`) needs no prompt.
#   user: carol (tests/cluster/add-users.sh), login2's test user: the other e2e tests force-clean alice
#       and bob.
#
# The namespaces persist as files: /run/netns/login2 (ip netns) and /run/spunnel-login2/ns/{uts,mnt}
# (unshare --uts=FILE --mount=FILE; their directory is a private bind mount of itself). Run a command there
# with tests/cluster/on-host login2 USER CMD... ; tests use tests/e2e/hosts.py. Facts for tests:
# /run/spunnel-login2/login2.env.
#
#   login2.sh          bring login2 up, or, when it is up, re-check its health and restart what died
#   login2.sh --down   remove it (down.sh does this first): carol's jobs, its sshd and every process left in
#                      its namespaces, the namespaces, the veth pair, routes, forwarding, marked lines
#
# Needs the cluster of up.sh (the c1 namespace, spn-login, /run/spunnel-test/cluster.env). Run as root. It
# touches nothing of up.sh's daemons: no slurm.conf change, no restart of slurmctld, slurmd or the sshds.
set -Eeuo pipefail

T0=$(date +%s.%N)
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export LC_ALL=C
umask 022

readonly RUN=/run/spunnel-login2          # namespace files, pidfile, logs, login2.env; removed by --down
readonly NSDIR=$RUN/ns
readonly ETC=/etc/spunnel-test            # sshd config, host key, login2's Jupyter site config
readonly CLUSTER_ENV=/run/spunnel-test/cluster.env
readonly NS=login2 HOST=login2
readonly ROOT_IF=spn-r-l2 HOST_IF=spn-l2
readonly ROOT_ADDR=10.200.1.1 HOST_ADDR=10.200.1.2 HOST_NET=10.200.1.0/24
readonly C1_NS=c1 C1_LINK=spn-login C1_NET=10.200.0.0/24
readonly MARK='# spunnel-test:login2'
readonly USERS=(carol)
readonly SITE_CONFIG=/etc/jupyter/jupyter_spunnel_jupyter_config.json
readonly LOG=$RUN/login2.log

REPO=$(cd "$(dirname "$0")/../.." && pwd)
readonly REPO
cd / # daemons inherit the working directory: never one that may vanish

say() { printf 'login2: %s\n' "$*"; }
die() {
    local f
    printf 'login2: ERROR: %s\n' "$1" >&2
    shift
    for f in "$@"; do
        [[ -s $f ]] || continue
        printf 'login2: last lines of %s:\n' "$f" >&2
        tail -n 20 "$f" | sed 's/^/    /' >&2
    done
    exit 1
}
trap 'printf "login2: FAILED (exit %s) at line %s: %s\n" "$?" "$LINENO" "$BASH_COMMAND" >&2' ERR

[[ $(id -u) -eq 0 ]] || { echo "login2: must run as root" >&2; exit 1; }

# shellcheck source=tests/cluster/pidfiles.sh
source "$REPO/tests/cluster/pidfiles.sh"

wait_until() { # wait_until SECONDS CMD...: poll every 0.1 s
    local deadline=$(($(date +%s%N) + $1 * 1000000000))
    shift
    until "$@" >/dev/null 2>&1; do
        (($(date +%s%N) < deadline)) || return 1
        sleep 0.1
    done
}
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# ns_inode FILE: the namespace bound to FILE ("" when FILE holds none).
ns_inode() { [[ $(stat -f -c %T "$1" 2>/dev/null) == nsfs ]] && stat -L -c %i "$1"; }
# in_login2 PID: PID lives in login2's current network and mount namespaces.
in_login2() {
    local net mnt
    net=$(ns_inode "/run/netns/$NS") && mnt=$(ns_inode "$NSDIR/mnt") || return 1
    [[ $(readlink "/proc/$1/ns/net" 2>/dev/null) == "net:[$net]" &&
        $(readlink "/proc/$1/ns/mnt" 2>/dev/null) == "mnt:[$mnt]" ]]
}
# procs_in_login2: every live process in login2's network or mount namespace.
procs_in_login2() {
    local net="" mnt="" d
    net=$(ns_inode "/run/netns/$NS") || true
    mnt=$(ns_inode "$NSDIR/mnt") || true
    [[ -n $net || -n $mnt ]] || return 0
    for d in /proc/[0-9]*; do
        if [[ -n $net && $(readlink "$d/ns/net" 2>/dev/null) == "net:[$net]" ]] ||
            [[ -n $mnt && $(readlink "$d/ns/mnt" 2>/dev/null) == "mnt:[$mnt]" ]]; then
            running "${d#/proc/}" && echo "${d#/proc/}"
        fi
    done
    return 0
}
# in_host CMD...: run CMD as root inside all of login2's namespaces.
in_host() { nsenter --net="/run/netns/$NS" --uts="$NSDIR/uts" --mount="$NSDIR/mnt" -- "$@"; }

# terminate SECONDS PID...: TERM, then KILL whatever is left after SECONDS.
terminate() {
    local secs=$1 pid i left
    shift
    (($#)) || return 0
    kill -TERM "$@" 2>/dev/null || true
    for ((i = 0; i < secs * 10; i++)); do
        left=0
        for pid in "$@"; do running "$pid" && left=1; done
        ((left)) || return 0
        sleep 0.1
    done
    kill -KILL "$@" 2>/dev/null || true
}

# set_marked_lines FILE: the lines of FILE ending in $MARK become exactly stdin's; other lines are kept (up.sh's
# own "# spunnel-test" lines too). In place, no rename.
set_marked_lines() {
    local file=$1 new want
    want=$(cat)
    new=$( (grep -v -- " $MARK\$" "$file" 2>/dev/null || true; [[ -z $want ]] || printf '%s\n' "$want") )
    if [[ $new != "$(cat "$file" 2>/dev/null)" ]]; then
        if [[ -n $new ]]; then printf '%s\n' "$new" >"$file"; else : >"$file"; fi
        chmod 0644 "$file"
    fi
}

# ---------------------------------------------------------------------------------------------------------
down() {
    local pids=() pid
    # Jobs first, while the controller runs: login2's user may have jobs from either login host.
    if timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; then
        for u in "${USERS[@]}"; do
            getent passwd "$u" >/dev/null || continue
            timeout 10 scancel --full -u "$u" 2>/dev/null || true
            wait_until 15 test -z "$(timeout 5 squeue -h -u "$u" -o %i 2>/dev/null)" ||
                say "WARNING: jobs of $u still listed after 15 s"
        done
    fi
    # Its sshd and everything inside its namespaces (ssh sessions, spunnel-notebook, srun, ssh masters).
    mapfile -t pids < <(procs_in_login2)
    if pid=$(recorded_pid sshd-login2) && [[ " ${pids[*]} " != *" $pid "* ]]; then pids+=("$pid"); fi
    if ((${#pids[@]})); then
        terminate 5 "${pids[@]}"
        say "stopped ${#pids[@]} processes of login2 (its sshd and whatever ran inside)"
    fi
    if [[ -d $NSDIR ]]; then
        umount "$NSDIR/uts" "$NSDIR/mnt" 2>/dev/null || true
        umount "$NSDIR" 2>/dev/null || true
    fi
    if ip link show "$ROOT_IF" >/dev/null 2>&1; then ip link del "$ROOT_IF"; fi
    if [[ -e /run/netns/$NS ]]; then ip netns del "$NS"; fi
    if [[ -e /run/netns/$C1_NS ]] && ip -n "$C1_NS" route show "$HOST_NET" | grep -q .; then
        ip -n "$C1_NS" route del "$HOST_NET"
    fi
    if [[ -e /proc/sys/net/ipv4/conf/$C1_LINK/forwarding ]]; then
        echo 0 >"/proc/sys/net/ipv4/conf/$C1_LINK/forwarding"
    fi
    for f in /etc/hosts /etc/ssh/ssh_known_hosts; do
        [[ -f $f ]] && set_marked_lines "$f" </dev/null
    done
    if mountpoint -q "$NSDIR" 2>/dev/null; then
        die "$NSDIR is still mounted; not removing $RUN"
    fi
    rm -rf "$RUN"
    say "login2 removed in $(elapsed "$T0") s"
}
if [[ ${1:-} == --down ]]; then
    down
    exit 0
fi
[[ $# -eq 0 ]] || { echo "usage: login2.sh [--down]" >&2; exit 2; }

# ---------------------------------------------------------------------------------------------------------
# Up (or re-check). Facts of the first login host and c1 from up.sh.
trap '[[ $? -eq 0 ]] || printf "login2: FAILED; log in %s; login2.sh --down removes login2\n" "$LOG" >&2' EXIT
if [[ ! -r $CLUSTER_ENV || ! -e /run/netns/$C1_NS ]] || ! ip link show "$C1_LINK" >/dev/null 2>&1; then
    die "the test cluster is not up (no $CLUSTER_ENV, namespace $C1_NS or link $C1_LINK): run tests/cluster/up.sh"
fi
declare -A CL
while IFS='=' read -r k v; do [[ -n $k ]] && CL[$k]=$v; done <"$CLUSTER_ENV"
readonly LOGIN_ADDR=${CL[LOGIN_ADDR]} NODE=${CL[NODE]} NODE_ADDR=${CL[NODE_ADDR]} ADOPT=${CL[ADOPT]:-0}
[[ -f $SITE_CONFIG ]] || die "$SITE_CONFIG missing: run tests/cluster/up.sh (it writes the site config)"

install -d -m 0755 "$RUN" "$NSDIR" "$ETC"
: >"$LOG"
quiet() {
    printf '\n+ %s\n' "$*" >>"$LOG"
    "$@" >>"$LOG" 2>&1 || die "command failed: $*" "$LOG"
}

# 1. Network namespace, veth pair, routes, forwarding between the two veths only.
[[ -e /run/netns/$NS ]] || quiet ip netns add "$NS"
if ! ip link show "$ROOT_IF" >/dev/null 2>&1; then
    quiet ip link add "$ROOT_IF" type veth peer name "$HOST_IF" netns "$NS"
fi
ip -n "$NS" link show "$HOST_IF" >/dev/null 2>&1 ||
    die "$ROOT_IF exists but its peer $HOST_IF is not in namespace $NS: run login2.sh --down, then login2.sh"
ip -br addr show dev "$ROOT_IF" | grep -qw "$ROOT_ADDR/24" || quiet ip addr add "$ROOT_ADDR/24" dev "$ROOT_IF"
ip -n "$NS" -br addr show dev "$HOST_IF" | grep -qw "$HOST_ADDR/24" ||
    quiet ip -n "$NS" addr add "$HOST_ADDR/24" dev "$HOST_IF"
quiet ip link set "$ROOT_IF" up
quiet ip -n "$NS" link set "$HOST_IF" up
quiet ip -n "$NS" link set lo up
link_up() { [[ $(cat "/sys/class/net/$ROOT_IF/operstate") == up ]] && ip -n "$NS" -br link show "$HOST_IF" | grep -qw UP; }
wait_until 5 link_up || die "the veth pair $ROOT_IF/$HOST_IF is not up after 5 s"
# Routes through the root namespace; `replace` is a no-op when the route is already there.
quiet ip -n "$NS" route replace "$C1_NET" via "$ROOT_ADDR"
quiet ip -n "$C1_NS" route replace "$HOST_NET" via "$LOGIN_ADDR"
# IPv4 forwards a packet when its incoming interface has forwarding on: these two, not eth0 or anything else.
for i in "$C1_LINK" "$ROOT_IF"; do
    [[ $(cat "/proc/sys/net/ipv4/conf/$i/forwarding") == 1 ]] || echo 1 >"/proc/sys/net/ipv4/conf/$i/forwarding"
done

# 2. UTS and mount namespaces, bound to files. Binding a mount namespace needs its file's mount not to be
# shared (the bind would propagate into the new namespace itself): a private bind mount of $NSDIR.
if ! mountpoint -q "$NSDIR"; then
    quiet mount --bind "$NSDIR" "$NSDIR"
fi
quiet mount --make-private "$NSDIR"
if [[ -z $(ns_inode "$NSDIR/uts") || -z $(ns_inode "$NSDIR/mnt") ]]; then
    # A half-made pair (one bound, not the other) is not trusted: start over, stopping its sshd first.
    if pid=$(recorded_pid sshd-login2); then terminate 5 "$pid"; fi
    umount "$NSDIR/uts" "$NSDIR/mnt" 2>/dev/null || true
    rm -f "$NSDIR/uts" "$NSDIR/mnt"
    touch "$NSDIR/uts" "$NSDIR/mnt"
    # --propagation private (unshare's default, spelled out): nothing done inside reaches the root namespace.
    quiet nsenter --net="/run/netns/$NS" unshare --uts="$NSDIR/uts" --mount="$NSDIR/mnt" --propagation private true
    say "namespaces: created (uts, mount)"
fi

# Inside: hostname, a private /tmp, login2's own Jupyter site config, and no copies of the namespace files
# (a copied /run/netns/c1 would keep an old c1 alive after down.sh; the mounts are private, so unmounting
# them here does not touch the root namespace's).
mkdir -p "$ETC/login2"
printf '{"SshTunnel": {"reverse_host": "%s"}}\n' "$HOST" >"$ETC/login2/jupyter_spunnel_jupyter_config.json.new"
if cmp -s "$ETC/login2/jupyter_spunnel_jupyter_config.json.new" "$ETC/login2/jupyter_spunnel_jupyter_config.json"; then
    rm -f "$ETC/login2/jupyter_spunnel_jupyter_config.json.new"
else
    mv -f "$ETC/login2/jupyter_spunnel_jupyter_config.json.new" "$ETC/login2/jupyter_spunnel_jupyter_config.json"
fi
chmod 0644 "$ETC/login2/jupyter_spunnel_jupyter_config.json"
# shellcheck disable=SC2016 # expanded by the inner shell
quiet in_host sh -euc '
    host=$1 nsdir=$2 own=$3 site=$4
    [ "$(hostname)" = "$host" ] || hostname "$host"
    for m in /run/netns "$nsdir"; do
        if mountpoint -q "$m"; then
            [ "$(findmnt -n -o PROPAGATION --mountpoint "$m")" = private ] || { echo "$m is not private" >&2; exit 1; }
            umount -R "$m"
        fi
    done
    [ "$(findmnt -n -o FSTYPE --mountpoint /tmp)" = tmpfs ] ||
        mount -t tmpfs -o mode=1777,nosuid,nodev,size=2g spunnel-login2-tmp /tmp
    if ! cmp -s "$own" "$site"; then
        ! mountpoint -q "$site" || umount "$site"
        mount --bind "$own" "$site"
    fi
' sh "$HOST" "$NSDIR" "$ETC/login2/jupyter_spunnel_jupyter_config.json" "$SITE_CONFIG"
check_inside() { # its own hostname, and a /tmp that is a tmpfs and not the root namespace's /tmp
    [[ $(in_host hostname) == "$HOST" ]] &&
        [[ $(in_host findmnt -n -o FSTYPE --mountpoint /tmp) == tmpfs ]] &&
        [[ $(in_host stat -c %d:%i /tmp) != "$(stat -c %d:%i /tmp)" ]]
}
check_inside || die "login2's namespaces are not as expected (hostname $(in_host hostname), /tmp $(in_host findmnt -n -o FSTYPE --mountpoint /tmp))"

# 3. Names: login2 resolves everywhere (/etc/hosts is shared by all three).
set_marked_lines /etc/hosts <<EOF
$HOST_ADDR $HOST $MARK
EOF

# 4. The user of login2's tests.
quiet bash "$REPO/tests/cluster/add-users.sh" "${USERS[@]}"

# 5. sshd on 10.200.1.2:22, in all three namespaces, its own host key and config.
key=$ETC/ssh_host_ed25519_key.$HOST
[[ -s $key && -s $key.pub ]] || { rm -f "$key" "$key.pub"; quiet ssh-keygen -q -t ed25519 -N '' -C "sshd-$HOST@spunnel-test" -f "$key"; }
conf=$ETC/sshd_config.$HOST
cat >"$conf.new" <<EOF
# Written by tests/cluster/login2.sh (spunnel-jupyter test cluster, second login host).
ListenAddress $HOST_ADDR:22
HostKey $key
PidFile none
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin no
AllowTcpForwarding yes
AllowStreamLocalForwarding yes
StreamLocalBindUnlink yes
MaxSessions 50
MaxStartups 100
UseDNS no
PrintMotd no
X11Forwarding no
Subsystem sftp internal-sftp
EOF
conf_changed=false
if ! cmp -s "$conf.new" "$conf"; then
    mv -f "$conf.new" "$conf"
    conf_changed=true
else
    rm -f "$conf.new"
fi
chmod 0644 "$conf"
quiet /usr/sbin/sshd -t -f "$conf"
sshd_listens() {
    local pid
    pid=$(recorded_pid sshd-login2) || return 1
    nsenter --net="/run/netns/$NS" ss -Hltnp "src $HOST_ADDR and sport = :22" | grep -q "pid=$pid,"
}
sshd_ok() {
    local pid
    pid=$(recorded_pid sshd-login2) && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == sshd ]] && running "$pid" &&
        in_login2 "$pid" && sshd_listens
}
if $conf_changed || ! sshd_ok; then
    if pid=$(recorded_pid sshd-login2); then terminate 5 "$pid"; fi
    rm -f "$RUN/sshd-login2.pid"
    # nsenter execs sshd (no --pid, so no fork): $! is sshd itself.
    setsid nsenter --net="/run/netns/$NS" --uts="$NSDIR/uts" --mount="$NSDIR/mnt" -- \
        /usr/sbin/sshd -D -e -f "$conf" </dev/null >>"$RUN/sshd-login2.out" 2>&1 &
    pid=$!
    st=$(starttime_of "$pid") || die "sshd ($HOST) exited at once" "$RUN/sshd-login2.out"
    echo "$pid $st" >"$RUN/sshd-login2.pid"
    wait_until 10 sshd_ok || die "sshd ($HOST) is not listening on $HOST_ADDR:22 after 10 s" "$RUN/sshd-login2.out"
    say "sshd ($HOST, $HOST_ADDR:22): started"
fi
read -r key_type key_data _ <"$key.pub"
touch /etc/ssh/ssh_known_hosts
set_marked_lines /etc/ssh/ssh_known_hosts <<EOF
$HOST,$HOST_ADDR $key_type $key_data $MARK
EOF

# 6. What tests read.
cat >"$RUN/login2.env.new" <<EOF
HOST=$HOST
ADDR=$HOST_ADDR
ROOT_ADDR=$ROOT_ADDR
NETNS=/run/netns/$NS
UTSNS=$NSDIR/uts
MNTNS=$NSDIR/mnt
SSHD_PIDFILE=$RUN/sshd-login2.pid
USERS=$(IFS=,; echo "${USERS[*]}")
EOF
mv -f "$RUN/login2.env.new" "$RUN/login2.env"

# 7. Health, as the test user, through the same wrapper tests use.
user=${USERS[0]}
on() { "$REPO/tests/cluster/on-host" "$@"; }
# expect WHAT WANT CMD...: CMD must succeed and print exactly WANT.
expect() {
    local what=$1 want=$2 out
    shift 2
    if ! out=$("$@" 2>&1) || [[ $out != "$want" ]]; then
        die "$what: expected '$want', got '$out'" "$RUN/sshd-login2.out"
    fi
}
expect "hostname on $HOST as $user" "$HOST" on "$HOST" "$user" hostname
if [[ $ADOPT == 1 ]]; then
    say "SPUNNEL_ADOPT=1: $NODE's sshd admits only into a job of one's own; not checking ssh $NODE without one"
else
    expect "ssh $NODE hostname from $HOST as $user" "$NODE" \
        on "$HOST" "$user" timeout 20 ssh -o BatchMode=yes "$NODE" hostname
fi
expect "ssh $HOST hostname from the first login host as $user" "$HOST" \
    on login "$user" timeout 20 ssh -o BatchMode=yes "$HOST" hostname
# srun from login2: the controller over the routed link, slurmd on c1 back to srun's ports on login2, and from
# inside the job ssh back to login2 (what a reverse tunnel needs). The node may be full of other tests' jobs.
# node_has_room: one CPU and 500 MB free on the node now (other tests' jobs may hold it all).
node_has_room() {
    local -A n=()
    local kv
    for kv in $(scontrol show node "$NODE" -o 2>/dev/null); do n[${kv%%=*}]=${kv#*=}; done
    ((${n[CPUTot]:-0} - ${n[CPUAlloc]:-0} >= 1 && ${n[RealMemory]:-0} - ${n[AllocMem]:-0} >= 500))
}
rc=0
if node_has_room; then
    out=$(on "$HOST" "$user" timeout 60 srun -p interact --immediate=10 -t 1 \
        sh -c 'hostname && ssh -o BatchMode=yes '"$HOST"' hostname' 2>&1) || rc=$?
else
    rc=1 out="Requested nodes are busy (no free CPU or 500 MB on $NODE)"
fi
if ((rc)) && [[ $out == *"Requested nodes are busy"* || $out == *"Unable to allocate resources"*"mmediate"* ]]; then
    say "node $NODE busy with other jobs: skipped the srun check (${out##*$'\n'})"
elif ((rc)) || [[ $(tail -n 2 <<<"$out" | tr '\n' ' ') != "$NODE $HOST " ]]; then
    die "srun on $HOST as $user (hostname, then ssh $HOST hostname inside the job) printed: $out" \
        "$RUN/sshd-login2.out"
fi

say "up: $HOST ($HOST_ADDR; routes via $ROOT_ADDR / $LOGIN_ADDR), sshd $HOST_ADDR:22 (pid $(pid=$(recorded_pid sshd-login2); echo "$pid")), /tmp private, user ${USERS[*]}; $(elapsed "$T0") s"
