#!/usr/bin/env bash
# Stand up a real one-exec-node Slurm cluster with two sshds on this machine, for the end-to-end tests.
#
#   login side (root network namespace, hostname = `hostname -s`): slurmctld, sshd on 10.200.0.1:22 and
#       127.0.0.1:2222, munged (shared by both sides through its Unix socket)
#   c1 (network namespace "c1" + its own UTS namespace, hostname c1, 10.200.0.2): slurmd -N c1, sshd on
#       10.200.0.2:22
#   login2, a second login host (tests/cluster/login2.sh, run at the end): network namespace "login2"
#       (10.200.1.2, routed to c1 through the root namespace), its own UTS namespace (hostname login2) and
#       mount namespace (a private /tmp), its own sshd on 10.200.1.2:22, Slurm's client commands; test user
#       carol. tests/cluster/on-host login|login2 USER CMD... runs a command as USER on either login host.
#
# The filesystem, users and /tmp are shared (but login2 has its own /tmp); a server bound to 127.0.0.1 inside c1
# is reachable from the login side only through ssh, as on a real cluster. Run as root. Idempotent: when
# everything is already up it only re-checks health. Daemons it starts are recorded in /run/spunnel-test/*.pid
# ("PID STARTTIME"), and down.sh stops exactly those. Facts and pitfalls behind the choices here:
# /work/shared/TESTBED.md.
#
# Environment knobs:
#   SPUNNEL_SKIP_PROJECT=1     tolerate a project that does not install (installs jupyterlab, ipykernel and
#                              jupyter_server into the venv instead), for working on this script alone
#   SPUNNEL_PROCTRACK=linuxproc  force proctrack/linuxproc + task/none even where cgroup v1 is available
#   SPUNNEL_NODE_CORES=N       cores c1 declares (default 16: sixteen one-CPU jobs at once, 500 MB each)
#   SPUNNEL_NODE_USERNS=0      c1 with unprivileged user namespaces switched off (its slurmd in a user
#                              namespace that allows no further one; tests/cluster/no-userns.py)
#   SPUNNEL_ADOPT=1            the pam_slurm_adopt variant: PrologFlags=contain, and c1's sshd (PAM service
#                              sshd-adopt) admits a user only into a job of theirs on c1 (needs cgroup v1).
#                              Running up.sh without it switches back to the plain cluster.
#   SPUNNEL_SLURM=25.11        the same cluster on Slurm 25.11.7 (built once from the vendored source into
#                              /opt/slurm-25.11 by tests/cluster/slurm-25.11.sh, pyslurm 25.11.2 into the venv):
#                              its daemons, /etc/slurm-25.11, state and spool dirs of its own, and its client
#                              commands linked into /usr/local/bin (first on every PATH, on c1 and login2 too).
#                              Without it (or =22.05) Debian's 22.05 again: the links go, its daemons come back.
#                              Switching cancels every job (state files do not cross releases).
set -Eeuo pipefail

T0=$(date +%s.%N)
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export LC_ALL=C
umask 022

readonly RUN=/run/spunnel-test            # pidfiles, cluster.env, logs; removed by down.sh
readonly ETC=/etc/spunnel-test            # sshd configs and host keys; kept across down/up
readonly LOG=$RUN/up.log
readonly NS=c1 NODE=c1
readonly LOGIN_IF=spn-login NODE_IF=spn-c1
readonly LOGIN_ADDR=10.200.0.1 NODE_ADDR=10.200.0.2
readonly SSHD_LOGIN_PORT=2222
readonly MARK='# spunnel-test'
readonly VENV_ROOT=/opt/spunnel VENV=/opt/spunnel/venv
readonly PROJECT_GROUP=spunnel-proj
readonly USERS=(alice bob)
readonly NODE_CORES=${SPUNNEL_NODE_CORES:-16} # declared, not real: see SlurmdParameters=config_overrides
readonly ADOPT=${SPUNNEL_ADOPT:-0}
readonly NODE_USERNS=${SPUNNEL_NODE_USERNS:-1}
readonly RELEASE=${SPUNNEL_SLURM:-22.05}
readonly PACKAGES=(slurm-wlm slurmctld slurmd slurm-client libslurm-dev libpam-slurm-adopt munge
    openssh-server openssh-client python3-venv python3-dev iproute2 procps util-linux psmisc curl
    chromium fonts-dejavu-core
    xvfb dbus-daemon dbus-bin libnotify-bin dunst x11-utils imagemagick desktop-file-utils) # test_desktop.py

REPO=$(cd "$(dirname "$0")/../.." && pwd)
readonly REPO
# The daemons started here inherit our working directory: never one that may vanish (a checkout that
# is deleted later leaves slurmstepd unable to getcwd, and its warning lands in every job's output).
cd /
LOGIN_HOST=$(hostname -s)
readonly LOGIN_HOST

say() { printf 'up: %s\n' "$*"; }
# die MESSAGE [LOGFILE...]: say what failed, show the end of the logs that tell why, stop.
die() {
    local f
    printf 'up: ERROR: %s\n' "$1" >&2
    shift
    for f in "$@"; do
        [[ -s $f ]] || continue
        printf 'up: last lines of %s:\n' "$f" >&2
        tail -n 20 "$f" | sed 's/^/    /' >&2
    done
    exit 1
}
trap 'printf "up: FAILED (exit %s) at line %s: %s\n" "$?" "$LINENO" "$BASH_COMMAND" >&2' ERR
trap '[[ $? -eq 0 ]] || printf "up: FAILED; logs in %s (daemons already started stay up; down.sh stops them)\n" "$RUN" >&2' EXIT

[[ $(id -u) -eq 0 ]] || { echo "up: must run as root" >&2; exit 1; }
[[ $NODE_CORES =~ ^[1-9][0-9]?$ ]] || { echo "up: SPUNNEL_NODE_CORES must be 1-99, not '$NODE_CORES'" >&2; exit 1; }
[[ $RELEASE == 22.05 || $RELEASE == 25.11 ]] || { echo "up: SPUNNEL_SLURM must be 22.05 or 25.11, not '$RELEASE'" >&2; exit 1; }
install -d -m 0755 "$RUN" "$ETC"
: >"$LOG"

# Run a noisy command with its output in the log; on failure show the log tail and stop.
quiet() {
    printf '\n+ %s\n' "$*" >>"$LOG"
    "$@" >>"$LOG" 2>&1 || die "command failed: $*" "$LOG"
}

# wait_until SECONDS CMD...: poll CMD every 0.1 s until it succeeds (status 0) or SECONDS pass (status 1).
wait_until() {
    local deadline=$(($(date +%s%N) + $1 * 1000000000))
    shift
    until "$@" >/dev/null 2>&1; do
        (($(date +%s%N) < deadline)) || return 1
        sleep 0.1
    done
}

elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# ---------------------------------------------------------------------------------------------------------
# shellcheck source=tests/cluster/pidfiles.sh
source "$REPO/tests/cluster/pidfiles.sh"

# alive NAME COMM: the daemon recorded in $RUN/NAME.pid is still that process and now runs COMM.
alive() {
    local pid
    pid=$(recorded_pid "$1") || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$2" ]] || return 1
    running "$pid"
}
pid_of() { local pid _; read -r pid _ <"$RUN/$1.pid"; echo "$pid"; }

# in_c1 PID: the process lives in the current c1 network namespace (not one from before a down/up).
in_c1() {
    [[ $(readlink "/proc/$1/ns/net" 2>/dev/null) == "net:[$(stat -L -c %i "/run/netns/$NS")]" ]]
}

# launch NAME CMD...: start CMD detached (own session, no inherited fds) and record its pid. The commands
# passed here exec their way to the daemon (nsenter, unshare, sh -c 'exec ...', setpriv), never fork, so $!
# is the daemon itself.
# without_inherited_fds CMD...: exec CMD with only stdin, stdout and stderr. A daemon must not keep
# what this script inherited: a lock held on it (`flock FILE bash up.sh`) would stay held for the
# daemon's whole life.
without_inherited_fds() {
    local fd
    for fd in /proc/$BASHPID/fd/*; do
        fd=${fd##*/}
        ((fd > 2)) && eval "exec $fd>&-" 2>/dev/null
    done
    exec "$@"
}

launch() {
    local name=$1 pid st
    shift
    without_inherited_fds setsid "$@" </dev/null >>"$RUN/$name.out" 2>&1 &
    pid=$!
    st=$(starttime_of "$pid") || die "$name exited at once" "$RUN/$name.out"
    echo "$pid $st" >"$RUN/$name.pid"
}

# stop NAME: SIGTERM the recorded daemon, SIGKILL after 5 s (used when its configuration changed).
stop() {
    local pid i
    if pid=$(recorded_pid "$1"); then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            running "$pid" || break
            sleep 0.1
        done
        if running "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$RUN/$1.pid"
}

# write_if_changed FILE MODE: replace FILE with stdin only when the content differs; status 0 = changed.
write_if_changed() {
    local file=$1 mode=$2 tmp
    tmp=$(mktemp "$file.XXXXXX")
    cat >"$tmp"
    chmod "$mode" "$tmp"
    if [[ -f $file ]] && cmp -s "$tmp" "$file"; then
        rm -f "$tmp"
        return 1
    fi
    mv -f "$tmp" "$file"
    return 0
}

# set_marked_lines FILE: make the lines of FILE ending in $MARK exactly stdin's lines (each ending in $MARK),
# keeping every other line. Rewrites in place (no rename), so a bind-mounted /etc/hosts works too.
set_marked_lines() {
    local file=$1 new want
    want=$(cat)
    new=$( (grep -v -- " $MARK\$" "$file" 2>/dev/null || true; printf '%s\n' "$want") )
    if [[ $new != "$(cat "$file" 2>/dev/null)" ]]; then
        printf '%s\n' "$new" >"$file"
        chmod 0644 "$file"
    fi
}

# ---------------------------------------------------------------------------------------------------------
# 1. Packages
missing=()
for p in "${PACKAGES[@]}"; do
    [[ $(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null) == installed ]] || missing+=("$p")
done
if ((${#missing[@]})); then
    say "installing packages (missing: ${missing[*]})"
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        # Keep package postinst scripts from starting daemons: this script starts its own.
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
    fi
    quiet apt-get update
    quiet env DEBIAN_FRONTEND=noninteractive apt-get install -y "${PACKAGES[@]}"
    say "packages installed in $(elapsed "$T0") s"
fi

# 1b. The Slurm release. Debian's 22.05 lives in /usr; 25.11 in /opt/slurm-25.11 (built and cached by
# slurm-25.11.sh), with a configuration, state and spool directories and logs of its own.
readonly S25=/opt/slurm-25.11
if [[ $RELEASE == 25.11 ]]; then
    bash "$REPO/tests/cluster/slurm-25.11.sh" slurm || die "building Slurm 25.11 failed (tests/cluster/slurm-25.11.sh)"
    SBIN=$S25/sbin SLURM_BIN=$S25/bin SLURM_ETC=/etc/slurm-25.11 SFX=-25.11
    PAM_ADOPT=$S25/lib/security/pam_slurm_adopt.so
else
    SBIN=/usr/sbin SLURM_BIN=/usr/bin SLURM_ETC=/etc/slurm SFX=""
    PAM_ADOPT=pam_slurm_adopt.so
fi
readonly SBIN SLURM_BIN SLURM_ETC SFX PAM_ADOPT
readonly STATE_DIR=/var/spool/slurmctld$SFX CTLD_LOG=/var/log/slurm/slurmctld$SFX.log
readonly SLURMD_LOG=/var/log/slurm/slurmd$SFX-$NODE.log
T_CLUSTER=$(date +%s.%N)

# ---------------------------------------------------------------------------------------------------------
# 2. munge: one munged serves both sides (its socket is a file on the shared filesystem).
if [[ ! -s /etc/munge/munge.key ]]; then
    quiet mungekey --create --keyfile=/etc/munge/munge.key
fi
chown munge:munge /etc/munge/munge.key
chmod 0600 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
if alive munged munged; then
    :
elif munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "munged: already running, not started by this script (down.sh will leave it)"
else
    rm -f /run/munge/munged.pid
    launch munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F
    wait_until 10 sh -c 'munge -n </dev/null | unmunge' ||
        die "munged does not answer after 10 s" "$RUN/munged.out" /var/log/munge/munged.log
    say "munged: started"
fi

# ---------------------------------------------------------------------------------------------------------
# 3. Network: c1 is a network namespace behind a veth pair.
[[ -e /run/netns/$NS ]] || quiet ip netns add "$NS"
if ! ip link show "$LOGIN_IF" >/dev/null 2>&1; then
    quiet ip link add "$LOGIN_IF" type veth peer name "$NODE_IF" netns "$NS"
fi
ip -n "$NS" link show "$NODE_IF" >/dev/null 2>&1 ||
    die "$LOGIN_IF exists but its peer $NODE_IF is not in namespace $NS: run down.sh, then up.sh"
ip -br addr show dev "$LOGIN_IF" | grep -qw "$LOGIN_ADDR/24" || quiet ip addr add "$LOGIN_ADDR/24" dev "$LOGIN_IF"
ip -n "$NS" -br addr show dev "$NODE_IF" | grep -qw "$NODE_ADDR/24" ||
    quiet ip -n "$NS" addr add "$NODE_ADDR/24" dev "$NODE_IF"
quiet ip link set "$LOGIN_IF" up
quiet ip -n "$NS" link set "$NODE_IF" up
quiet ip -n "$NS" link set lo up
link_up() { [[ $(cat "/sys/class/net/$LOGIN_IF/operstate") == up ]] && ip -n "$NS" -br link show "$NODE_IF" | grep -qw UP; }
wait_until 5 link_up || die "the veth pair $LOGIN_IF/$NODE_IF is not up after 5 s"

set_marked_lines /etc/hosts <<EOF
$NODE_ADDR $NODE $MARK
$LOGIN_ADDR spunnel-login $MARK
EOF

# ---------------------------------------------------------------------------------------------------------
# 4. Slurm configuration
have_cgroup_v1() {
    local c
    for c in freezer cpuset memory; do
        awk -v mp="/sys/fs/cgroup/$c" -v c="$c" \
            '$2 == mp && $3 == "cgroup" && ("," $4 ",") ~ ("," c ",") { found = 1 } END { exit !found }' \
            /proc/mounts || return 1
    done
}
if [[ ${SPUNNEL_PROCTRACK:-} != linuxproc ]] && have_cgroup_v1; then
    PROCTRACK=cgroup
    plugins="ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup"
else
    [[ ${SPUNNEL_PROCTRACK:-} == linuxproc ]] || say "cgroup v1 freezer/cpuset/memory not mounted under /sys/fs/cgroup"
    PROCTRACK=linuxproc
    plugins="ProctrackType=proctrack/linuxproc
TaskPlugin=task/none"
fi

prolog_flags=""
if [[ $ADOPT == 1 ]]; then
    [[ $PROCTRACK == cgroup ]] || die "SPUNNEL_ADOPT=1 needs proctrack/cgroup (cgroup v1 controllers)"
    # pam_slurm_adopt puts ssh sessions into the job's extern step, which this creates (~3 s per job).
    prolog_flags="PrologFlags=contain"
fi

# Release differences: 25.11 refuses CryptoType (its daemons stop on it: credentials are CredType now, munge
# by default) and calls CgroupAutomount defunct (an error in every daemon's log).
crypto_type="CryptoType=crypto/munge" automount="CgroupAutomount=no"
[[ $RELEASE == 22.05 ]] || crypto_type="" automount=""
install -d -o slurm -g slurm -m 0755 "$STATE_DIR" /var/log/slurm
install -d -o root -g root -m 0755 "/var/spool/slurmd$SFX-$NODE" "$SLURM_ETC"
slurm_changed=false
write_if_changed "$SLURM_ETC/slurm.conf" 0644 <<EOF && slurm_changed=true
# Written by tests/cluster/up.sh (spunnel-jupyter test cluster, Slurm $RELEASE); rewritten on every run.
ClusterName=spunnel
SlurmctldHost=$LOGIN_HOST($LOGIN_ADDR)
SlurmUser=slurm
AuthType=auth/munge
$crypto_type
MpiDefault=none
SwitchType=switch/none
$plugins
$prolog_flags
StateSaveLocation=$STATE_DIR
SlurmctldPidFile=/run/slurmctld.pid
SlurmctldLogFile=$CTLD_LOG
SlurmdSpoolDir=/var/spool/slurmd$SFX-%n
SlurmdPidFile=/run/slurmd-%n.pid
SlurmdLogFile=/var/log/slurm/slurmd$SFX-%n.log
# The node declares more cores than this machine has, so that many one-CPU jobs can run at once.
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
KillWait=5
MinJobAge=300
ReturnToService=2
InactiveLimit=0
SlurmctldTimeout=30
# A node whose slurmd stopped answering is set DOWN (its jobs NODE_FAIL) about 50 s later (30 s and
# the controller's ping rounds), not minutes: the node-failure test in tests/e2e/test_faults.py waits
# for Slurm's own verdict. Not shorter: munge stopped for a teardown (~15 s) must not down the node.
# ReturnToService=2 returns the node to service when slurmd registers again.
SlurmdTimeout=30

NodeName=$NODE NodeAddr=$NODE_ADDR Sockets=1 CoresPerSocket=$NODE_CORES ThreadsPerCore=1 RealMemory=8000 State=UNKNOWN
PartitionName=interact Nodes=$NODE Default=YES MaxTime=8:00:00 State=UP
PartitionName=debug Nodes=$NODE MaxTime=1:00:00 State=UP
EOF
write_if_changed "$SLURM_ETC/cgroup.conf" 0644 <<EOF && slurm_changed=true
# Written by tests/cluster/up.sh (spunnel-jupyter test cluster).
CgroupPlugin=cgroup/v1
CgroupMountpoint=/sys/fs/cgroup
$automount
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
EOF

# The client commands of the release: 25.11's linked into /usr/local/bin (before /usr/bin on every PATH:
# ours, sshd's sessions on c1 and login2, jobs), none for 22.05. Only links into $S25/bin are ever removed.
client_links() {
    local f name link
    for link in /usr/local/bin/*; do
        [[ -L $link && $(readlink "$link") == "$S25/bin/"* ]] || continue
        if [[ $RELEASE != 25.11 || ! -x $(readlink "$link") ]]; then rm -f "$link"; fi
    done
    [[ $RELEASE == 25.11 ]] || return 0
    for f in "$S25"/bin/*; do
        name=${f##*/}
        link=/usr/local/bin/$name
        [[ -e $link && ! -L $link ]] && die "$link exists and is not a link: not replacing it with $f"
        [[ $(readlink "$link" 2>/dev/null) == "$f" ]] || ln -sfn "$f" "$link"
    done
}

# release_of NAME: the Slurm release of the recorded daemon NAME (by its executable), "" if none runs.
release_of() {
    local pid exe
    pid=$(recorded_pid "$1") || return 0
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 0
    if [[ $exe == "$S25/"* ]]; then echo 25.11; else echo 22.05; fi
}
# Switching releases: the other release's jobs are cancelled while its controller still runs (with its own
# client commands), then its daemons stop; state files do not cross releases.
old=$(release_of slurmctld)
[[ -n $old ]] || old=$(release_of slurmd)
if [[ -n $old && $old != "$RELEASE" ]]; then
    say "switching the cluster from Slurm $old to $RELEASE"
    old_bin=/usr/bin
    [[ $old == 25.11 ]] && old_bin=$S25/bin
    if [[ $(release_of slurmctld) == "$old" ]] && timeout 5 "$old_bin/scontrol" ping 2>/dev/null | grep -q 'is UP'; then
        jobs=$(timeout 10 "$old_bin/squeue" -h -o %i 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086 # one job id per word
            timeout 10 "$old_bin/scancel" $jobs || true
            wait_until 15 test -z "$(timeout 5 "$old_bin/squeue" -h -o %i 2>/dev/null)" ||
                say "WARNING: jobs of Slurm $old still listed after 15 s: $(echo $jobs)"
        fi
    fi
    stop slurmd
    stop slurmctld
fi
client_links

if $slurm_changed; then
    say "slurm configuration written (Slurm $RELEASE, proctrack/$PROCTRACK)"
    stop slurmd
    stop slurmctld
fi

# ---------------------------------------------------------------------------------------------------------
# 5. slurmctld (login side) and slurmd (inside c1)
if ! alive slurmctld slurmctld || [[ $(release_of slurmctld) != "$RELEASE" ]]; then
    stop slurmctld
    launch slurmctld "$SBIN/slurmctld" -D
    say "slurmctld (Slurm $RELEASE): started"
fi
wait_until 20 sh -c 'scontrol ping | grep -q "is UP"' ||
    die "slurmctld does not answer after 20 s" "$RUN/slurmctld.out" "$CTLD_LOG"

# SPUNNEL_NODE_USERNS=0: slurmd (and so every job on c1) in a user namespace that maps every id
# to itself and allows no further one: a node with unprivileged user namespaces switched off.
userns_as_asked() {
    local own theirs
    own=$(readlink /proc/self/ns/user) && theirs=$(readlink "/proc/$(pid_of slurmd)/ns/user") || return 1
    if [[ $NODE_USERNS == 0 ]]; then [[ $theirs != "$own" ]]; else [[ $theirs == "$own" ]]; fi
}
if ! alive slurmd slurmd || ! in_c1 "$(pid_of slurmd)" || ! userns_as_asked || [[ $(release_of slurmd) != "$RELEASE" ]]; then
    stop slurmd
    no_userns=()
    [[ $NODE_USERNS == 0 ]] && no_userns=(/usr/bin/python3 "$REPO/tests/cluster/no-userns.py")
    # Not `ip netns exec`: it remounts /sys, hiding /sys/fs/cgroup from slurmd (TESTBED.md).
    launch slurmd nsenter --net="/run/netns/$NS" "${no_userns[@]}" unshare --uts \
        sh -c "hostname $NODE && exec $SBIN/slurmd -D -N $NODE"
    say "slurmd ($NODE): started"
fi

node_state() { sinfo -h -n "$NODE" -o %t 2>/dev/null; }
# 25.11 marks a node that backfill has planned jobs for with a "-" (mix-, idle-): ready all the same.
node_ready() { [[ $(node_state) =~ ^(idle|mix|alloc)-?$ ]]; }
if ! node_ready; then
    # A node that failed registration shows as drain/down with a reason; say it instead of timing out blind.
    deadline=$(($(date +%s) + 30))
    until node_ready; do
        if (($(date +%s) >= deadline)); then
            die "node $NODE is not idle after 30 s: $(sinfo -h -n "$NODE" -o '%t %E' 2>&1)" \
                "$RUN/slurmd.out" "$SLURMD_LOG" "$CTLD_LOG"
        fi
        alive slurmd slurmd || die "slurmd exited" "$RUN/slurmd.out" "$SLURMD_LOG"
        sleep 0.1
    done
fi
T_IDLE=$(date +%s.%N)
state=$(node_state)
cpus=$(sinfo -h -n "$NODE" -o %c)
[[ $cpus == "$NODE_CORES" ]] ||
    die "node $NODE registered $cpus CPUs, expected $NODE_CORES (SlurmdParameters=config_overrides not honoured?)"
# on_node USER WHAT CMD...: run CMD in a one-CPU job on the node as USER, output in $out. Status 2 when the
# node has no room for even that right now: tests may keep it busy, which is no fault of the cluster.
on_node() {
    local user=$1 what=$2 rc=0
    shift 2
    if [[ $state == alloc* ]]; then
        say "node $NODE fully allocated by running jobs: skipping $what"
        return 2
    fi
    out=$(cd / && exec runuser -u "$user" -- timeout 60 srun -p interact --immediate=10 -t 1 "$@" 2>&1) || rc=$?
    if ((rc)) && [[ $out == *"Requested nodes are busy"* ]]; then
        say "node $NODE busy with running jobs: skipping $what"
        return 2
    fi
    ((rc == 0)) || die "$what failed (as $user, srun -p interact $*): $out" "$SLURMD_LOG"
}
if on_node root "the srun check" hostname; then
    # The last line: srun may first say it waits for a step (a user's job still on the node).
    [[ ${out##*$'\n'} == "$NODE" ]] || die "srun -p interact hostname printed '$out', expected '$NODE'"
fi

# ---------------------------------------------------------------------------------------------------------
# 6. Users, each with its own key (tests/cluster/add-users.sh).
quiet bash "$REPO/tests/cluster/add-users.sh" "${USERS[@]}"
# A project group of the first user's only: inside the node's private /tmp (a user namespace) a
# supplementary group must still count. (slurmctld caches a user's groups once it has looked
# them up: a group added after a first job shows only after its restart.)
getent group "$PROJECT_GROUP" >/dev/null || quiet groupadd "$PROJECT_GROUP"
id -nG "${USERS[0]}" | grep -qw "$PROJECT_GROUP" || quiet usermod -aG "$PROJECT_GROUP" "${USERS[0]}"

# ---------------------------------------------------------------------------------------------------------
# 7. Two sshds, each with its own config and host key.
install -d -m 0755 /run/sshd
sshd_conf() { # sshd_conf NAME USEPAM LISTEN...
    local name=$1 usepam=$2 a
    shift 2
    echo "# Written by tests/cluster/up.sh (spunnel-jupyter test cluster)."
    for a in "$@"; do echo "ListenAddress $a"; done
    cat <<EOF
HostKey $ETC/ssh_host_ed25519_key.$name
PidFile none
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM $usepam
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
}
# port_owner NETNS|- ADDR:PORT: who holds that listening TCP socket ("users:((...))"), or "nobody".
port_owner() {
    local pre=()
    [[ $1 == - ]] || pre=(nsenter --net="/run/netns/$1")
    "${pre[@]}" ss -Hltnp "src ${2%:*} and sport = :${2##*:}" | grep -o 'users:.*' || echo nobody
}
# sshd_listens NAME NETNS|- ADDR:PORT...: the sshd recorded as NAME itself holds every listening socket (a
# port held by some other process, or an sshd that could bind only some of its addresses, does not count).
sshd_listens() {
    local name=$1 netns=$2 pid a
    shift 2
    pid=$(pid_of "$name")
    for a in "$@"; do
        port_owner "$netns" "$a" | grep -q "pid=$pid," || return 1
    done
}
# ensure_sshd SIDE NETNS|- ADDR:PORT...: a healthy sshd for SIDE, started (or restarted) when needed.
ensure_sshd() {
    local side=$1 netns=$2 name=sshd-$1 a held=""
    shift 2
    local bin=/usr/sbin/sshd
    [[ $side == c1 && $ADOPT == 1 ]] && bin=$SSHD_ADOPT
    if alive "$name" "${bin##*/}" && { [[ $netns == - ]] || in_c1 "$(pid_of "$name")"; } &&
        sshd_listens "$name" "$netns" "$@"; then
        return 0
    fi
    stop "$name"
    if [[ $netns == - ]]; then
        launch "$name" /usr/sbin/sshd -D -e -f "$ETC/sshd_config.$side"
    else
        launch "$name" nsenter --net="/run/netns/$netns" unshare --uts \
            sh -c "hostname $NODE && exec $bin -D -e -f $ETC/sshd_config.$side"
    fi
    if ! wait_until 10 sshd_listens "$name" "$netns" "$@"; then
        for a in "$@"; do held+=" $a held by $(port_owner "$netns" "$a");"; done
        die "sshd ($side) is not listening on all of $* after 10 s:$held" "$RUN/$name.out"
    fi
    say "sshd ($side, $*): started"
}
# The adoption variant: the PAM service name is sshd's program name, hence a link of its own.
readonly SSHD_ADOPT=/usr/local/sbin/sshd-adopt
c1_pam=no
if [[ $ADOPT == 1 ]]; then
    c1_pam=yes
    ln -sfn /usr/sbin/sshd "$SSHD_ADOPT"
    write_if_changed /etc/pam.d/sshd-adopt 0644 <<EOF || true
# Written by tests/cluster/up.sh (pam_slurm_adopt variant of the spunnel-jupyter test cluster, Slurm $RELEASE).
account    required     $PAM_ADOPT nodename=$NODE service=sshd-adopt
@include common-account
@include common-session-noninteractive
EOF
fi
for side in c1 login; do
    key=$ETC/ssh_host_ed25519_key.$side
    [[ -s $key && -s $key.pub ]] || { rm -f "$key" "$key.pub"; quiet ssh-keygen -q -t ed25519 -N '' -C "sshd-$side@spunnel-test" -f "$key"; }
    if [[ $side == c1 ]]; then
        sshd_conf c1 "$c1_pam" "$NODE_ADDR:22" | write_if_changed "$ETC/sshd_config.c1" 0644 && stop sshd-c1
    else
        sshd_conf login no "$LOGIN_ADDR:22" "127.0.0.1:$SSHD_LOGIN_PORT" |
            write_if_changed "$ETC/sshd_config.login" 0644 && stop sshd-login
    fi
    quiet /usr/sbin/sshd -t -f "$ETC/sshd_config.$side"
done
ensure_sshd c1 "$NS" "$NODE_ADDR:22"
ensure_sshd login - "$LOGIN_ADDR:22" "127.0.0.1:$SSHD_LOGIN_PORT"

read -r c1_type c1_key _ <"$ETC/ssh_host_ed25519_key.c1.pub"
read -r lg_type lg_key _ <"$ETC/ssh_host_ed25519_key.login.pub"
touch /etc/ssh/ssh_known_hosts
set_marked_lines /etc/ssh/ssh_known_hosts <<EOF
$NODE,$NODE_ADDR $c1_type $c1_key $MARK
spunnel-login,$LOGIN_ADDR $lg_type $lg_key $MARK
[127.0.0.1]:$SSHD_LOGIN_PORT $lg_type $lg_key $MARK
EOF

if [[ $ADOPT == 1 ]]; then
    # Without a job on c1, pam_slurm_adopt must refuse (the tests check admission into a job).
    out=$(cd / && runuser -u "${USERS[0]}" -- timeout 20 ssh -o BatchMode=yes "$NODE" hostname 2>&1) &&
        die "ssh $NODE as ${USERS[0]} without a job was admitted: pam_slurm_adopt is not in effect"
    [[ $out == *pam_slurm_adopt* ]] || die "ssh $NODE as ${USERS[0]} failed otherwise: $out"
else
    out=$(cd / && runuser -u "${USERS[0]}" -- timeout 20 ssh -o BatchMode=yes "$NODE" hostname 2>&1) ||
        die "ssh -o BatchMode=yes $NODE hostname as ${USERS[0]} failed: $out"
    [[ $out == "$NODE" ]] || die "ssh $NODE hostname as ${USERS[0]} printed '$out', expected '$NODE'"
fi
out=$(cd / && runuser -u "${USERS[1]}" -- timeout 20 ssh -o BatchMode=yes -p "$SSHD_LOGIN_PORT" 127.0.0.1 hostname 2>&1) ||
    die "ssh to the login sshd (127.0.0.1:$SSHD_LOGIN_PORT) as ${USERS[1]} failed: $out"
[[ $out == "$LOGIN_HOST" ]] || die "ssh to the login sshd printed '$out', expected '$LOGIN_HOST'"

# ---------------------------------------------------------------------------------------------------------
# 8. Python environment shared by both sides. Built from /usr/bin/python3: jobs run as normal users cannot
# execute a Python under /root (pyenv). A regular (non-editable) install, so the checkout's location and
# permissions do not matter; to pick up code changes, re-run up.sh.
readonly HAVE_MODULES='import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in sys.argv[1:]))'
pip() { quiet env -u PYTHONPATH -u PYTHONHOME "$VENV/bin/pip" "$@"; }
if [[ ! -x $VENV/bin/python ]] || ! grep -qx 'home = /usr/bin' "$VENV/pyvenv.cfg" 2>/dev/null; then
    say "creating $VENV from /usr/bin/python3"
    rm -rf "$VENV" "$VENV_ROOT/.deps-hash" "$VENV_ROOT/.src-hash"
    install -d -m 0755 "$VENV_ROOT"
    quiet /usr/bin/python3 -m venv "$VENV"
    pip install --upgrade pip
fi
deps_hash=$(sha256sum <"$REPO/pyproject.toml" | cut -d' ' -f1)
src_hash=$(bash "$REPO/tests/cluster/src-hash") # what goes into the wheel
# Building the JupyterLab extension into the wheel needs Node.js >= 20.19 (Rspack 2); Debian 12's is 18.
node_version=$(node --version 2>/dev/null || echo none)
[[ $node_version =~ ^v([0-9]+)\.([0-9]+) ]] &&
    ((BASH_REMATCH[1] > 20 || (BASH_REMATCH[1] == 20 && BASH_REMATCH[2] >= 19))) ||
    die "Node.js >= 20.19 is needed to build the JupyterLab extension (found: $node_version)"
venv_changed=false
project_ok=true
PROJECT_LOG=$RUN/project-install.log
if [[ ${SPUNNEL_SKIP_PROJECT:-} == 1 && $(cat "$RUN/project-failed" 2>/dev/null) == "$deps_hash $src_hash" ]]; then
    project_ok=false # this very source already failed to install during this boot; do not retry
elif [[ $(cat "$VENV_ROOT/.deps-hash" 2>/dev/null) != "$deps_hash" ]]; then
    say "installing the project with its [node,test] extras into $VENV (dependencies changed)"
    if env -u PYTHONPATH "$VENV/bin/pip" install "${REPO}[node,test]" >"$PROJECT_LOG" 2>&1; then
        echo "$deps_hash" >"$VENV_ROOT/.deps-hash"
        echo "$src_hash" >"$VENV_ROOT/.src-hash"
    else
        project_ok=false
    fi
    venv_changed=true
elif [[ $(cat "$VENV_ROOT/.src-hash" 2>/dev/null) != "$src_hash" ]]; then
    say "reinstalling the project into $VENV (sources changed)"
    if env -u PYTHONPATH "$VENV/bin/pip" install --no-deps --force-reinstall "$REPO" >"$PROJECT_LOG" 2>&1; then
        echo "$src_hash" >"$VENV_ROOT/.src-hash"
    else
        project_ok=false
    fi
    venv_changed=true
fi
if ! $project_ok; then
    if [[ ${SPUNNEL_SKIP_PROJECT:-} != 1 ]]; then
        die "pip install of the project from $REPO failed (SPUNNEL_SKIP_PROJECT=1 carries on without it)" \
            "$PROJECT_LOG"
    fi
    say "WARNING: the project from $REPO does not install (log: $PROJECT_LOG); SPUNNEL_SKIP_PROJECT=1, carrying on without it"
    echo "$deps_hash $src_hash" >"$RUN/project-failed"
    if ! "$VENV/bin/python" -c "$HAVE_MODULES" jupyterlab ipykernel jupyter_server 2>/dev/null; then
        pip install jupyterlab ipykernel jupyter_server
    fi
fi
if $venv_changed; then
    chmod -R a+rX "$VENV_ROOT"
fi
if [[ -x $VENV/bin/spunnel-notebook ]]; then
    ln -sfn "$VENV/bin/spunnel-notebook" /usr/local/bin/spunnel-notebook
elif [[ -L /usr/local/bin/spunnel-notebook ]]; then
    rm -f /usr/local/bin/spunnel-notebook
fi
# Importing jupyterlab takes ~2.5 s (rfc3987_syntax builds a parser at import time), so the full import check
# runs once per venv content per boot; an unchanged venv on a re-run only gets a cheap lookup.
check='import ipykernel, jupyterlab'
stamp="$deps_hash $src_hash $project_ok"
if [[ $(cat "$RUN/venv-checked" 2>/dev/null) == "$stamp" ]]; then
    check="$HAVE_MODULES"
fi
# Both sides at once: each import is CPU-bound and there are two cores.
(cd / && exec runuser -u "${USERS[0]}" -- "$VENV/bin/python" -c "$check" ipykernel jupyterlab) >"$RUN/check-login.out" 2>&1 &
login_check=$!
rc=0
on_node "${USERS[0]}" "the venv check on $NODE" "$VENV/bin/python" -c "$check" ipykernel jupyterlab || rc=$?
wait "$login_check" ||
    die "as ${USERS[0]} on the login side, $VENV/bin/python -c '$check' failed: $(cat "$RUN/check-login.out")"
((rc)) || echo "$stamp" >"$RUN/venv-checked"

# 8a. pyslurm (Slurm 25.11 only: PyPI has no release for 22.05). The wheel is built once against
# /opt/slurm-25.11 and stays in the venv when the cluster goes back to 22.05, where importing it works
# (it reads /etc/slurm-25.11/slurm.conf) but its calls fail: a 25.11 client cannot talk to a 22.05 controller.
PYSLURM=0
if [[ $RELEASE == 25.11 ]]; then
    bash "$REPO/tests/cluster/slurm-25.11.sh" pyslurm || die "building or installing pyslurm failed (tests/cluster/slurm-25.11.sh)"
    out=$(cd / && runuser -u "${USERS[0]}" -- "$VENV/bin/python" -c \
        'import pyslurm; print(" ".join(sorted(pyslurm.Partitions.load())))' 2>&1) ||
        die "as ${USERS[0]}, import pyslurm / Partitions.load() failed: $out"
    [[ $out == "debug interact" ]] || die "pyslurm as ${USERS[0]} lists the partitions '$out', expected 'debug interact'"
    PYSLURM=1
fi

# ---------------------------------------------------------------------------------------------------------
# 8b. The site's spunnel-jupyter configuration, as an administrator would write it: the nodes reach this
# login host as spunnel-login (its own name resolves to their loopback inside c1's namespace).
install -d -m 0755 /etc/jupyter
write_if_changed /etc/jupyter/jupyter_spunnel_jupyter_config.json 0644 <<EOF || true
{"SshTunnel": {"reverse_host": "spunnel-login"}}
EOF

# ---------------------------------------------------------------------------------------------------------
# 9. What the tests read.
write_if_changed "$RUN/cluster.env" 0644 <<EOF || true
SLURM_RELEASE=$RELEASE
SLURM_CONF=$SLURM_ETC/slurm.conf
SLURM_BIN=$SLURM_BIN
SLURMCTLD_LOG=$CTLD_LOG
PYSLURM=$PYSLURM
PROCTRACK=$PROCTRACK
ADOPT=$ADOPT
NODE_USERNS=$NODE_USERNS
LOGIN_HOST=$LOGIN_HOST
LOGIN_ADDR=$LOGIN_ADDR
NODE=$NODE
NODE_ADDR=$NODE_ADDR
NODE_CPUS=$NODE_CORES
PARTITIONS=interact,debug
USERS=$(IFS=,; echo "${USERS[*]}")
VENV=$VENV
SSHD_LOGIN_PORT=$SSHD_LOGIN_PORT
PROJECT_INSTALLED=$($project_ok && [[ -f $VENV_ROOT/.src-hash ]] && echo 1 || echo 0)
EOF

# ---------------------------------------------------------------------------------------------------------
# 9b. The second login host (its own facts: /run/spunnel-login2/login2.env).
bash "$REPO/tests/cluster/login2.sh" || die "tests/cluster/login2.sh failed (the second login host)"

# ---------------------------------------------------------------------------------------------------------
# 10. Summary
say "cluster up (Slurm $("$SBIN/slurmctld" -V | cut -d' ' -f2)): controller $LOGIN_HOST ($LOGIN_ADDR), node $NODE ($NODE_ADDR, $cpus CPUs, $state)," \
    "partitions interact (default) and debug, proctrack/$PROCTRACK"
say "sshd: $NODE:22, $LOGIN_ADDR:22, 127.0.0.1:$SSHD_LOGIN_PORT; users: ${USERS[*]}; venv: $VENV"
say "settings for tests: $RUN/cluster.env; log: $LOG"
say "elapsed: $(elapsed "$T0") s total, $(awk -v a="$T_CLUSTER" -v b="$T_IDLE" 'BEGIN { printf "%.1f", b - a }') s from after packages to node ready"
