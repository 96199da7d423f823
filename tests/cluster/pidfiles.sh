# shellcheck shell=bash
# Sourced by up.sh and down.sh (needs RUN). Pidfiles in $RUN hold "PID STARTTIME": the start time (field 22
# of /proc/PID/stat) survives exec but not pid reuse, so a stale pidfile never makes us trust, or later
# kill, an unrelated process.

starttime_of() {
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    s=${s##*) }
    # shellcheck disable=SC2086
    set -- $s
    echo "${20}"
}

# running PID: the process exists and is not a zombie. PID 1 on these machines does not reap orphans, so a
# daemon that exited after up.sh ended stays a zombie, with its /proc entry, for good.
running() { [[ -r /proc/$1/status ]] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }

# recorded_pid NAME: the pid recorded for NAME, if that very process (same start time) still exists.
recorded_pid() {
    local pid st
    [[ -r $RUN/$1.pid ]] || return 1
    read -r pid st <"$RUN/$1.pid" || return 1
    [[ $pid =~ ^[0-9]+$ && $(starttime_of "$pid" 2>/dev/null) == "$st" ]] || return 1
    echo "$pid"
}
