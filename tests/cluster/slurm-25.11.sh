#!/usr/bin/env bash
# Slurm 25.11 for the test cluster (SPUNNEL_SLURM=25.11 up.sh), built from the vendored source, and pyslurm
# built against it. Both cached: a second run that finds them built from the same inputs does nothing.
#
#   slurm-25.11.sh slurm     Slurm 25.11.7 into /opt/slurm-25.11 (sysconfdir /etc/slurm-25.11), with
#                            contribs/pam_slurm_adopt (for SPUNNEL_ADOPT=1); ~6 min on 2 cores
#   slurm-25.11.sh pyslurm   a pyslurm 25.11.2 wheel built against it (cached in /opt/slurm-25.11/wheels,
#                            ~4 min), installed into /opt/spunnel/venv (which up.sh creates)
#   slurm-25.11.sh           both
#
# The source: slurm-25.11.7.tar.xz in $SPUNNEL_VENDOR, else <checkout>/../shared/vendor/, else
# /work/shared/vendor/; its sha256 must be the one below (vendor/README.md). Built with rpath (Slurm's
# default): the binaries, plugins, pam_slurm_adopt and pyslurm find /opt/slurm-25.11/lib on their own, so
# nothing is added to the dynamic linker's global search path, where 25.11's unversioned libslurmfull.so
# could shadow Debian's 22.05 one. The stamp /opt/slurm-25.11/.spunnel-stamp holds the tarball's sha256
# and the configure arguments; the pyslurm wheel's name holds the stamp's hash. Run as root.
set -Eeuo pipefail

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export LC_ALL=C
umask 022

readonly VERSION=25.11.7
readonly TARBALL=slurm-$VERSION.tar.xz
readonly SHA256=f71f1e5f33a72e7864104a6857e86862eac3c4e5e348c92dd0c10dbe03a82dec
readonly PREFIX=/opt/slurm-25.11 SYSCONFDIR=/etc/slurm-25.11
readonly CONFIGURE_ARGS=(--prefix=$PREFIX --sysconfdir=$SYSCONFDIR --disable-debug)
readonly STAMP=$PREFIX/.spunnel-stamp
readonly BUILD_DEPS=(build-essential pkg-config libmunge-dev libpam0g-dev python3-venv python3-dev)
readonly PYSLURM_VERSION=25.11.2
readonly WHEELS=$PREFIX/wheels BUILD_VENV=$PREFIX/build-venv
readonly VENV=/opt/spunnel/venv
readonly LOG=/var/log/spunnel-slurm-25.11-build.log

REPO=$(cd "$(dirname "$0")/../.." && pwd)
readonly REPO

say() { printf 'slurm-25.11: %s\n' "$*"; }
die() {
    printf 'slurm-25.11: ERROR: %s\n' "$1" >&2
    if [[ ${2:-} == log && -s $LOG ]]; then
        printf 'slurm-25.11: last lines of %s:\n' "$LOG" >&2
        tail -n 30 "$LOG" | sed 's/^/    /' >&2
    fi
    exit 1
}
trap 'printf "slurm-25.11: FAILED (exit %s) at line %s: %s\n" "$?" "$LINENO" "$BASH_COMMAND" >&2' ERR
quiet() {
    printf '\n+ %s\n' "$*" >>"$LOG"
    "$@" >>"$LOG" 2>&1 || die "command failed: $*" log
}
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }'; }

[[ $(id -u) -eq 0 ]] || die "must run as root"
what=${1:-all}
[[ $what =~ ^(slurm|pyslurm|all)$ && $# -le 1 ]] || { echo "usage: slurm-25.11.sh [slurm|pyslurm|all]" >&2; exit 2; }

stamp_text() { printf 'slurm %s sha256 %s\nconfigure %s\npam_slurm_adopt\n' "$VERSION" "$SHA256" "${CONFIGURE_ARGS[*]}"; }
slurm_built() {
    [[ $(cat "$STAMP" 2>/dev/null) == "$(stamp_text)" && -x $PREFIX/sbin/slurmctld && -x $PREFIX/bin/srun &&
        -f $PREFIX/lib/security/pam_slurm_adopt.so ]]
}

build_slurm() {
    if slurm_built; then
        return 0
    fi
    local t0 src="" d missing=() p dir
    t0=$(date +%s.%N)
    for d in "${SPUNNEL_VENDOR:-}" "$REPO/../shared/vendor" /work/shared/vendor; do
        if [[ -n $d && -f $d/$TARBALL ]]; then
            src=$d/$TARBALL
            break
        fi
    done
    [[ -n $src ]] || die "$TARBALL not found (set SPUNNEL_VENDOR to the directory holding it)"
    [[ $(sha256sum <"$src" | cut -d' ' -f1) == "$SHA256" ]] || die "$src: sha256 is not $SHA256"
    : >"$LOG"
    for p in "${BUILD_DEPS[@]}"; do
        [[ $(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null) == installed ]] || missing+=("$p")
    done
    if ((${#missing[@]})); then
        say "installing build dependencies: ${missing[*]}"
        quiet apt-get update
        quiet env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
    fi
    say "building Slurm $VERSION from $src into $PREFIX (~6 min on 2 cores; log: $LOG)"
    dir=$(mktemp -d /var/tmp/spunnel-slurm-build.XXXXXX)
    # shellcheck disable=SC2064 # expand now: the directory of this build
    trap "rm -rf '$dir'" EXIT
    quiet tar -C "$dir" -xJf "$src"
    cd "$dir/slurm-$VERSION"
    rm -f "$STAMP"
    quiet ./configure "${CONFIGURE_ARGS[@]}"
    quiet make -j"$(nproc)"
    quiet make install
    quiet make -C contribs/pam_slurm_adopt -j"$(nproc)" PAM_DIR="$PREFIX/lib/security"
    quiet make -C contribs/pam_slurm_adopt install PAM_DIR="$PREFIX/lib/security"
    cd /
    install -d -m 0755 "$SYSCONFDIR"
    stamp_text >"$STAMP"
    slurm_built || die "Slurm built, but $PREFIX lacks slurmctld, srun or lib/security/pam_slurm_adopt.so"
    say "Slurm $VERSION built in $(elapsed "$t0") s"
}

# The wheel's file name carries a hash of the Slurm stamp: a rebuilt Slurm means a rebuilt wheel.
wheel_tag() { sha256sum <"$STAMP" | cut -c1-12; }
pyslurm_installed() { # the venv has this very wheel installed (recorded beside the venv)
    [[ $(cat "${VENV%/venv}/.pyslurm" 2>/dev/null) == "$1" ]] &&
        [[ $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("pyslurm"))' 2>/dev/null) == "$PYSLURM_VERSION" ]]
}

build_pyslurm() {
    slurm_built || die "Slurm 25.11 is not built: run slurm-25.11.sh slurm first"
    [[ -x $VENV/bin/python ]] || die "$VENV does not exist: run tests/cluster/up.sh (it creates it)"
    local t0 tagdir wheel
    t0=$(date +%s.%N)
    tagdir=$WHEELS/$(wheel_tag)
    wheel=$(compgen -G "$tagdir/pyslurm-$PYSLURM_VERSION-*.whl" | head -n 1 || true)
    if [[ -z $wheel ]]; then
        say "building pyslurm $PYSLURM_VERSION against $PREFIX (~4 min; log: $LOG)"
        if [[ ! -x $BUILD_VENV/bin/python ]]; then
            quiet /usr/bin/python3 -m venv "$BUILD_VENV"
        fi
        quiet env -u PYTHONPATH "$BUILD_VENV/bin/pip" install --upgrade pip cython setuptools wheel
        rm -rf "$tagdir"
        install -d -m 0755 "$tagdir.tmp"
        # rpath: the extension finds libslurm in $PREFIX/lib without any global linker configuration.
        quiet env -u PYTHONPATH SLURM_INCLUDE_DIR=$PREFIX/include SLURM_LIB_DIR=$PREFIX/lib \
            LDFLAGS="-Wl,-rpath,$PREFIX/lib" \
            "$BUILD_VENV/bin/pip" wheel --no-build-isolation --no-deps --no-binary pyslurm \
            -w "$tagdir.tmp" "pyslurm==$PYSLURM_VERSION"
        mv "$tagdir.tmp" "$tagdir"
        wheel=$(compgen -G "$tagdir/pyslurm-$PYSLURM_VERSION-*.whl" | head -n 1) || die "no pyslurm wheel in $tagdir"
        chmod -R a+rX "$WHEELS"
        say "pyslurm $PYSLURM_VERSION built in $(elapsed "$t0") s"
    fi
    if ! pyslurm_installed "$wheel"; then
        quiet env -u PYTHONPATH "$VENV/bin/pip" install --no-deps --force-reinstall "$wheel"
        chmod -R a+rX "$VENV"
        echo "$wheel" >"${VENV%/venv}/.pyslurm"
        say "pyslurm $PYSLURM_VERSION installed into $VENV"
    fi
}

case $what in
slurm) build_slurm ;;
pyslurm) build_pyslurm ;;
all)
    build_slurm
    build_pyslurm
    ;;
esac
