#!/usr/bin/env bash
# ARM check: installs this checkout and runs its decoding, streaming, updates and encoding tests in
# Debian bookworm chroots for arm64 (Pi 3/4/5 on a 64-bit OS) and armhf (Pi Zero/2/3 on 32-bit
# Raspberry Pi OS), under qemu user-mode emulation. Too slow for CI (a first run builds each chroot
# in ~40 min); the chroots are kept in a cache folder, so later runs take minutes.
# Timings under qemu say nothing about the speed of a real Pi.
#
# usage (as root): benchmarks/arm_check.sh [--arch arm64|armhf] [--cache DIR] [--serial] [--tests "FILES"]
#   --arch     one architecture only (default: both, in parallel, each logging to CACHE/logs/ARCH.log)
#   --cache    where the chroots live (default: $NNC_ARM_CACHE or /var/cache/nnc-edge-arm)
#   --serial   build and test one architecture after the other (on a machine short of memory)
#   --tests    the test files to run, relative to the checkout (default: $DEFAULT_TESTS below)
# Environment: NNC_CONFORMANCE_DIR (else ../shared/conformance/nncodec-2.1.3 beside the checkout),
# DEBIAN_MIRROR (default http://deb.debian.org/debian).
# Needs only Debian packages: qemu-user-static, binfmt-support, debootstrap (installed when missing).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$REPO/benchmarks/$(basename "${BASH_SOURCE[0]}")"
CACHE=${NNC_ARM_CACHE:-/var/cache/nnc-edge-arm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
CONFORMANCE=${NNC_CONFORMANCE_DIR:-$REPO/../shared/conformance/nncodec-2.1.3}
DEFAULT_TESTS="tests/test_conformance.py tests/test_stream.py tests/test_slices.py tests/test_updates.py
tests/test_apply_streaming.py tests/test_encoding.py tests/test_quantize.py tests/test_32bit.py tests/test_device_setup.py"
TESTS=$DEFAULT_TESTS
ARCHES="arm64 armhf"
SERIAL=
CHROOT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

die() { echo "arm_check: $*" >&2; exit 1; }
log() { printf '[%s %s] %s\n' "$(date +%H:%M:%S)" "${ARCH:-host}" "$*"; }

qemu_of() { case $1 in arm64) echo aarch64 ;; armhf) echo arm ;; *) die "unknown architecture $1" ;; esac; }

# Debian's numpy on armhf: PyPI has no armv7l wheel, and Raspberry Pi OS users get this one too.
# libffi-dev: cffi has no armv7l wheel either, should anything (the host extra) pull it in.
apt_packages() {
    local common="python3-venv python3-dev build-essential ca-certificates"
    case $1 in armhf) echo "$common python3-numpy libffi-dev" ;; *) echo "$common" ;; esac
}

# --- inside a private mount namespace: mounts vanish with the process, so a chroot in the cache never
# keeps /dev or /proc bound and `rm -r` of the cache is always safe ------------------------------------
bind_ro() {  # bind_ro HOSTPATH ROOT: the same path inside the chroot, read-only
    local target="$2$1"
    if [ -d "$1" ]; then mkdir -p "$target"; else mkdir -p "$(dirname "$target")"; touch "$target"; fi
    mount --bind "$1" "$target"
    mount -o remount,bind,ro "$target"
}

if [ "${1:-}" = --in-namespace ]; then  # --in-namespace ROOT COMMAND: run COMMAND in the chroot
    root=$2; shift 2
    mount --make-rprivate /
    mount -t proc proc "$root/proc"
    mount -t sysfs sysfs "$root/sys"
    mount --bind /dev "$root/dev"
    mount --bind /dev/pts "$root/dev/pts" 2>/dev/null || true
    [ -f "$CONFORMANCE/manifest.json" ] && { mkdir -p "$root/conformance"; mount --bind "$CONFORMANCE" "$root/conformance"; }
    for dir in ${ARM_CHECK_BIND_DIRS:-}; do bind_ro "$dir" "$root"; done
    cp -L /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
    env_args=(PATH=$CHROOT_PATH HOME=/root LANG=C.UTF-8 TERM=dumb DEBIAN_FRONTEND=noninteractive)
    while IFS= read -r var; do env_args+=("$var"); done < <(env | grep -E '^(PIP_[A-Z_]+|SSL_CERT_FILE|REQUESTS_CA_BUNDLE|https?_proxy|HTTPS?_PROXY|no_proxy|NO_PROXY)=' || true)
    exec chroot "$root" /usr/bin/env -i "${env_args[@]}" /bin/bash -c "$1"
fi

in_chroot() {  # in_chroot ROOT COMMAND
    unshare --mount --propagation private /bin/bash "$SELF" --in-namespace "$1" "$2"
}

# --- host setup -----------------------------------------------------------------------------------------
host_setup() {
    [ "$(id -u)" = 0 ] || die "run as root (debootstrap, chroot and mounts need it)"
    local missing=
    command -v debootstrap >/dev/null || missing="$missing debootstrap"
    command -v update-binfmts >/dev/null || missing="$missing binfmt-support"
    [ -x /usr/bin/qemu-aarch64-static ] && [ -x /usr/bin/qemu-arm-static ] || missing="$missing qemu-user-static"
    command -v rsync >/dev/null || missing="$missing rsync"
    if [ -n "$missing" ]; then
        log "installing$missing"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >/dev/null
    fi
    [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    for arch in $ARCHES; do
        local q; q=$(qemu_of "$arch")
        [ -e "/proc/sys/fs/binfmt_misc/qemu-$q" ] || update-binfmts --enable "qemu-$q" \
            || die "cannot register qemu-$q with binfmt_misc"
    done
}

# pip's configuration: the same files, PIP_* variables and CA certificates as on the host. Files and
# directories that they name (a file:// index, find-links, a constraints file, a CA bundle) are bound
# read-only at the same path in the chroot.
PIP_CONFIG_FILES="/etc/pip.conf /etc/xdg/pip/pip.conf $HOME/.pip/pip.conf $HOME/.config/pip/pip.conf ${PIP_CONFIG_FILE:-}"

pip_referenced_paths() {
    local text="" f
    for f in $PIP_CONFIG_FILES; do [ -f "$f" ] && text+=" $(cat "$f")"; done
    text+=" $(env | grep -E '^(PIP_[A-Z_]+|SSL_CERT_FILE|REQUESTS_CA_BUNDLE)=' | cut -d= -f2-)"
    # A file:// "simple" index links to its files as ../../files/...: bind its parent.
    printf '%s\n' "$text" | tr -s ' \t=,' '\n' | sed -n 's#^\(file://\)\{0,1\}\(/[^ ]*\)$#\2#p' \
        | sed 's#/simple/\{0,1\}$##' | while read -r p; do [ -e "$p" ] && echo "$p"; done | sort -u
}

copy_pip_config() {  # copy_pip_config ROOT
    local root=$1 f dest
    for f in $PIP_CONFIG_FILES /etc/ssl/certs/ca-certificates.crt; do
        [ -f "$f" ] || continue
        dest="$root${f/#$HOME//root}"
        mkdir -p "$(dirname "$dest")"
        cp -L "$f" "$dest"
    done
    [ -d /etc/xdg/pip ] && { mkdir -p "$root/etc/xdg"; cp -rL /etc/xdg/pip "$root/etc/xdg/"; }
    ARM_CHECK_BIND_DIRS=""
    for p in $(pip_referenced_paths); do
        if [ -d "$p" ]; then ARM_CHECK_BIND_DIRS+=" $p"
        else mkdir -p "$(dirname "$root$p")"; cp -L "$p" "$root$p"; fi
    done
    export ARM_CHECK_BIND_DIRS
}

# --- one architecture ------------------------------------------------------------------------------------
build_chroot() {  # build_chroot ARCH ROOT: debootstrap (cached by a marker file)
    local arch=$1 root=$2 state=$CACHE/$1
    [ -e "$state/debootstrap.done" ] && return 0
    # A half-built root cannot be resumed; nothing is mounted in it (mounts live in private namespaces).
    grep -q " $root/" /proc/mounts && die "$root has mounts left: unmount them first"
    rm -rf "$root"
    mkdir -p "$root"
    log "debootstrap first stage (native)"
    debootstrap --foreign --arch="$arch" --variant=minbase "$SUITE" "$root" "$MIRROR"
    # The interpreter inside the chroot works whether or not binfmt_misc opened it in advance (F flag).
    cp "/usr/bin/qemu-$(qemu_of "$arch")-static" "$root/usr/bin/"
    # dpkg's fsyncs are what makes an emulated install crawl; the chroot is a disposable cache.
    mkdir -p "$root/etc/dpkg/dpkg.cfg.d"
    echo force-unsafe-io > "$root/etc/dpkg/dpkg.cfg.d/unsafe-io"
    log "debootstrap second stage (under qemu, ~35-40 min)"
    in_chroot "$root" "/debootstrap/debootstrap --second-stage"
    touch "$state/debootstrap.done"
}

install_packages() {  # install_packages ARCH ROOT: apt packages (cached; redone when the list changes)
    local packages; packages=$(apt_packages "$1")
    [ "$(cat "$CACHE/$1/apt.done" 2>/dev/null)" = "$packages" ] && return 0
    log "apt-get install $packages"
    in_chroot "$2" "apt-get update -q && apt-get install -y -q --no-install-recommends $packages && apt-get clean"
    echo "$packages" > "$CACHE/$1/apt.done"
}

# Runs in the chroot: a fresh venv, `pip install -e .` timed, the compiled modules checked, the tests.
# Writes key=value lines to /result.
CHROOT_SCRIPT='
set -u
cd /src/nnc-edge
rm -rf /opt/venv /result
python3 -m venv $VENV_FLAGS /opt/venv
. /opt/venv/bin/activate
start=$(date +%s)
pip install -q -e . || { echo "install=failed" > /result; exit 1; }
echo "install_s=$(( $(date +%s) - start ))" > /result
pyx=$(ls decoder_core/_*.pyx nnc_edge/encoder/_*.pyx | wc -l)
so=$(ls decoder_core/_*.so nnc_edge/encoder/_*.so 2>/dev/null | wc -l)
echo "compiled=$so/$pyx" >> /result
ls -l decoder_core/_*.so nnc_edge/encoder/_*.so
pip install -q pytest
nnc-edge --version | tee /tmp/version
echo "backend=$(sed -n "s/.*backend: \([a-z_-]*\).*/\1/p" /tmp/version)" >> /result
echo "numpy=$(python -c "import numpy; print(numpy.__version__)")" >> /result
python /speed.py /conformance/p1_real_silero_vad.nnc >> /result
NNC_CONFORMANCE_DIR=/conformance python -m pytest -q -p no:cacheprovider -o addopts= $TESTS 2>&1 | tee /tmp/pytest.out
summary=$(grep -E "^=*.* (passed|failed|error)" /tmp/pytest.out | tail -1)
count() { echo "$summary" | grep -oE "[0-9]+ $1" | grep -oE "[0-9]+" || echo 0; }
echo "passed=$(count passed)" >> /result
echo "failed=$(( $(count failed) + $(count error) ))" >> /result
echo "skipped=$(count skipped)" >> /result
'

# Decode speed (silero_vad, compiled backend, 1 thread, best of 3). Under emulation it says nothing about
# a Pi: qemu's ratio to a real CPU is not a Pi's. Printed so that a run that got much slower stands out.
speed_script() {
    cat <<'PY'
import sys
import time
import nnc_edge
data = open(sys.argv[1], "rb").read()
times = []
for _ in range(3):
    start = time.perf_counter()
    nnc_edge.decode(data, threads=1)
    times.append(time.perf_counter() - start)
print("silero_s=%.2f" % min(times))
PY
}

run_arch() {  # run_arch ARCH
    local arch=$1 root=$CACHE/$1/root
    ARCH=$arch
    mkdir -p "$CACHE/$arch"
    rm -f "$CACHE/$arch/result"
    build_chroot "$arch" "$root"
    install_packages "$arch" "$root"
    log "copying the checkout"
    mkdir -p "$root/src/nnc-edge"
    # --delete-excluded: modules built by an earlier run must not hide a failed compile now.
    rsync -a --delete --delete-excluded --exclude .git --exclude .venv --exclude build --exclude node_modules \
        --exclude '*.so' --exclude __pycache__ --exclude '*.egg-info' --exclude .pytest_cache \
        "$REPO/" "$root/src/nnc-edge/"
    copy_pip_config "$root"
    speed_script > "$root/speed.py"
    local venv_flags=""
    [ "$arch" = armhf ] && venv_flags=--system-site-packages
    log "fresh venv, pip install -e ., tests"
    in_chroot "$root" "export VENV_FLAGS='$venv_flags' TESTS='$(echo $TESTS)'; $CHROOT_SCRIPT" || true
    cp "$root/result" "$CACHE/$arch/result" 2>/dev/null || echo "install=failed" > "$CACHE/$arch/result"
    log "done: $(tr '\n' ' ' < "$CACHE/$arch/result")"
}

print_table() {
    local status=0 arch
    printf '\n%-13s %-13s %-9s %-7s %-8s %-8s %-9s %-8s %s\n' architecture "install time" compiled passed failed skipped \
        backend numpy "silero_vad decode under qemu"
    for arch in $ARCHES; do
        local install_s="" compiled="-" passed=0 failed="-" skipped=0 backend="-" numpy="-" install="" silero_s="-"
        [ -f "$CACHE/$arch/result" ] && eval "$(grep -E '^[a-z_]+=[A-Za-z0-9._/-]*$' "$CACHE/$arch/result")"
        local shown="${install_s:+$((install_s / 60)) min $((install_s % 60)) s}"
        [ -n "$install_s" ] || shown=${install:-not run}
        printf '%-13s %-13s %-9s %-7s %-8s %-8s %-9s %-8s %s\n' "$arch" "$shown" "$compiled" "$passed" "$failed" "$skipped" \
            "$backend" "$numpy" "${silero_s} s"
        [ "$failed" = 0 ] && [ "$backend" = cython ] || status=1
    done
    return $status
}

while [ $# -gt 0 ]; do
    case $1 in
        --arch) ARCHES=$2; qemu_of "$2" >/dev/null; shift 2 ;;
        --cache) CACHE=$2; shift 2 ;;
        --serial) SERIAL=1; shift ;;
        --tests) TESTS=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

host_setup
mkdir -p "$CACHE/logs"
[ -f "$CONFORMANCE/manifest.json" ] || log "conformance vectors not found in $CONFORMANCE: their tests will skip"
start=$SECONDS
if [ -n "$SERIAL" ] || [ "$(echo $ARCHES | wc -w)" = 1 ]; then
    for arch in $ARCHES; do run_arch "$arch" 2>&1 | tee "$CACHE/logs/$arch.log"; done
else
    for arch in $ARCHES; do
        log "$arch: building and testing in the background, log in $CACHE/logs/$arch.log"
        run_arch "$arch" > "$CACHE/logs/$arch.log" 2>&1 &
    done
    wait
fi
ARCH=
log "finished in $(( (SECONDS - start) / 60 )) min"
host_python=${NNC_HOST_PYTHON:-$REPO/.venv/bin/python}
if [ -x "$host_python" ] && [ -f "$CONFORMANCE/p1_real_silero_vad.nnc" ]; then
    log "silero_vad decode on this x86_64 host, natively, in the same run: $(cd "$REPO" && "$host_python" <(speed_script) \
        "$CONFORMANCE/p1_real_silero_vad.nnc" | sed "s/silero_s=//") s"
fi
print_table
