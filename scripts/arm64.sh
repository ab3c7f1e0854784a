#!/usr/bin/env bash
# fedprune's edge side on 64-bit ARM (Raspberry Pi OS bookworm = Debian 12 arm64, Python 3.11),
# emulated with qemu-user on an x86-64 Debian/Ubuntu host. No chroot, no binfmt_misc, no mounts.
# See docs/arm64.md.
#
#   scripts/arm64.sh setup               make or refresh the ARM userland and wheels (idempotent)
#   scripts/arm64.sh python ARGS...      ARM python3.11 with fedprune[edge,zstd,monitor] installed from its wheel
#   scripts/arm64.sh client ARGS...      fedprune-client (python -m fedprune.edge_client ARGS...) on ARM
#   scripts/arm64.sh test [PYTEST ARGS]  tests/edge_client, tests/protocol and tests/device_profiles on ARM
#   scripts/arm64.sh clean               delete the cache
#
# Environment:
#   FEDPRUNE_ARM64_CACHE        cache folder (default: .cache/arm64 in the repository)
#   FEDPRUNE_ARM64_CPU          emulated core: cortex-a72 (Raspberry Pi 4, default), cortex-a53
#                               (Pi 3, Zero 2 W) or cortex-a76 (Pi 5)
#   FEDPRUNE_ARM64_MIRROR       Debian mirror for debootstrap (default: the one apt uses here)
#   FEDPRUNE_ARM64_HOST_PYTHON  host Python 3.11 with pip (default: .venv/bin/python, else python3)
#   FEDPRUNE_WHEEL              fedprune's wheel to install (CI passes the one scripts/build.sh
#                               made); without it, setup builds one from this checkout
#
# The checkout itself is never on the ARM Python's path: the ARM side runs the installed wheel,
# as a device does.
# Every command but clean runs setup first; once everything is in place that takes well under 1 s.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd -P)
cache=${FEDPRUNE_ARM64_CACHE:-$repo/.cache/arm64}
cpu=${FEDPRUNE_ARM64_CPU:-cortex-a72}
suite=bookworm
platforms=(--platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64
  --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64)

log() { echo "arm64: $*" >&2; }
die() {
  log "error: $*"
  exit 1
}
sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

host_python() {
  if [ -n "${FEDPRUNE_ARM64_HOST_PYTHON:-}" ]; then
    echo "$FEDPRUNE_ARM64_HOST_PYTHON"
  elif [ -x "$repo/.venv/bin/python" ]; then
    echo "$repo/.venv/bin/python"
  else
    echo python3
  fi
}

paths() {
  mkdir -p "$cache"
  cache=$(cd "$cache" && pwd -P)
  rootfs=$cache/rootfs
  wheels=$cache/wheels
  site=$cache/site
  pycache=$cache/pycache
  launcher=$rootfs/usr/bin/fedprune-python3
  hostpy=$(host_python)
}

need_tools() {
  local packages=()
  command -v debootstrap >/dev/null || packages+=(debootstrap)
  command -v qemu-aarch64-static >/dev/null || packages+=(qemu-user-static)
  if [ ${#packages[@]} -gt 0 ]; then
    log "apt-get install ${packages[*]}"
    sudo_if_needed apt-get update -qq
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
  fi
  "$hostpy" -c 'import sys, tomllib; assert sys.version_info[:2] == (3, 11)' 2>/dev/null ||
    die "host Python $hostpy must be 3.11 (set FEDPRUNE_ARM64_HOST_PYTHON)"
}

mirror() {
  if [ -n "${FEDPRUNE_ARM64_MIRROR:-}" ]; then
    echo "$FEDPRUNE_ARM64_MIRROR"
    return
  fi
  local found
  found=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null |
    awk -v s="$suite" '$2 == s { print $1; exit }')
  echo "${found:-http://deb.debian.org/debian/}"
}

# 1. Debian bookworm arm64: debootstrap's first stage only (--foreign: nothing runs inside), then
# every downloaded .deb unpacked on top. dpkg -x would replace the merged-/usr symlinks (bin ->
# usr/bin) with directories, so the same extraction is done with --keep-directory-symlink.
make_rootfs() {
  [ -f "$rootfs/.fedprune-rootfs" ] && return
  [ "$(id -u)" -eq 0 ] || die "making the rootfs needs root (debootstrap refuses otherwise)"
  local partial=$cache/rootfs.partial m
  m=$(mirror)
  rm -rf "$partial" "$rootfs"
  log "debootstrap --foreign --arch=arm64 --variant=minbase --include=python3 $suite ($m)"
  if ! debootstrap --foreign --arch=arm64 --variant=minbase --include=python3 \
    "$suite" "$partial" "$m" >"$cache/debootstrap.log" 2>&1; then
    tail -n 20 "$cache/debootstrap.log" >&2
    die "debootstrap failed (whole log: $cache/debootstrap.log)"
  fi
  local debs=("$partial"/var/cache/apt/archives/*.deb)
  log "unpacking ${#debs[@]} packages"
  for deb in "${debs[@]}"; do
    dpkg-deb --fsys-tarfile "$deb" | tar -x --keep-directory-symlink -C "$partial"
  done
  rm -f "${debs[@]}"
  [ -x "$partial/usr/bin/python3.11" ] || die "no usr/bin/python3.11 in the new rootfs"
  # In a container debootstrap makes proc a symlink to the host's /proc, and dev holds device
  # nodes. qemu -L looks a path up in the rootfs first: empty folders send /dev and /proc to the
  # host's, except for the files written there (proc/cpuinfo, below).
  rm -rf "$partial/proc" "$partial/dev"
  mkdir "$partial/proc" "$partial/dev"
  printf '%s %s %s\n' "$suite" "$m" "$(date -u +%FT%TZ)" >"$partial/.fedprune-rootfs"
  mv "$partial" "$rootfs"
}

# The launcher is a host shell script inside the rootfs: Python finds its standard library from
# it (../lib/python3.11) and names it as sys.executable, so subprocesses that tests start with
# sys.executable run under qemu too, without binfmt_misc.
write_launcher() {
  local text
  # shellcheck disable=SC2016 # expanded when the launcher runs, not now
  text='#!/bin/sh
# Written by scripts/arm64.sh: runs this rootfs'"'"'s ARM python3.11 under qemu-user (host script).
rootfs=$(cd "$(dirname "$0")/../.." && pwd -P)
exec "${FEDPRUNE_ARM64_QEMU:-qemu-aarch64-static}" -cpu "${FEDPRUNE_ARM64_CPU:-cortex-a72}" \
  -L "$rootfs" -0 "$0" "$rootfs/usr/bin/python3.11" "$@"'
  if [ "$(cat "$launcher" 2>/dev/null)" != "$text" ]; then
    printf '%s\n' "$text" >"$launcher.tmp"
    chmod +x "$launcher.tmp"
    mv "$launcher.tmp" "$launcher"
  fi
}

# qemu 7.2 passes the host's x86 /proc/cpuinfo through; the cpuinfo library inside LiteRT then
# crashes (SIGSEGV) creating any Interpreter. qemu -L serves ROOTFS/proc/cpuinfo instead when it
# exists, so write what the emulated Raspberry Pi core would show, one entry per host CPU.
write_cpuinfo() {
  local part variant revision features model n i text=""
  case $cpu in
    cortex-a53) part=0xd03 variant=0x0 revision=4 model="Raspberry Pi 3 Model B Plus Rev 1.3"
      features="fp asimd evtstrm crc32 cpuid" ;;
    cortex-a72) part=0xd08 variant=0x0 revision=3 model="Raspberry Pi 4 Model B Rev 1.4"
      features="fp asimd evtstrm crc32 cpuid" ;;
    cortex-a76) part=0xd0b variant=0x4 revision=1 model="Raspberry Pi 5 Model B Rev 1.0"
      features="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp" ;;
    *) die "FEDPRUNE_ARM64_CPU=$cpu: use cortex-a72 (Pi 4), cortex-a53 (Pi 3, Zero 2 W) or cortex-a76 (Pi 5)" ;;
  esac
  [ -d "$rootfs/proc" ] && [ ! -L "$rootfs/proc" ] || die "$rootfs/proc is not a folder: run clean"
  n=$(getconf _NPROCESSORS_CONF)
  for ((i = 0; i < n; i++)); do
    text+=$(printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %d' \
      "$i" "$features" "$variant" "$part" "$revision")$'\n\n'
  done
  text+=$(printf 'Revision\t: 0\nSerial\t\t: 0000000000000000\nModel\t\t: %s' "$model")
  if [ "$(cat "$rootfs/proc/cpuinfo" 2>/dev/null)" != "$text" ]; then
    printf '%s\n' "$text" >"$rootfs/proc/cpuinfo.tmp"
    mv "$rootfs/proc/cpuinfo.tmp" "$rootfs/proc/cpuinfo"
  fi
}

# 2. aarch64 wheels of the edge, zstd and monitor extras plus pytest and hypothesis, downloaded with the host's pip
# (newer manylinux tags, else pip silently picks ai-edge-litert 1.4.0), unzipped into one folder.
make_wheels() {
  local reqs stamp partial
  reqs=$("$hostpy" "$repo/scripts/arm64/host.py" requirements)
  stamp=$(printf '%s\n' "$reqs" "${platforms[*]}" cp311 | sha256sum | cut -d' ' -f1)
  [ "$(cat "$wheels/.stamp" 2>/dev/null)" = "$stamp" ] && return
  partial=$cache/wheels.partial
  rm -rf "$partial"
  local req_list
  mapfile -t req_list <<<"$reqs"
  log "pip download (aarch64, cp311): ${req_list[*]}"
  "$hostpy" -m pip download -q --disable-pip-version-check --only-binary=:all: "${platforms[@]}" \
    --python-version 3.11 --implementation cp --abi cp311 -d "$partial" "${req_list[@]}"
  "$hostpy" "$repo/scripts/arm64/host.py" check-wheels "$partial" || die "unusable wheels in $partial"
  echo "$stamp" >"$partial/.stamp"
  rm -rf "$wheels"
  mv "$partial" "$wheels"
}

make_site() {
  local stamp partial=$cache/site.partial
  stamp=$(cat "$wheels/.stamp")
  [ "$(cat "$site/.stamp" 2>/dev/null)" = "$stamp" ] && return
  log "unpacking $(find "$wheels" -name '*.whl' | wc -l) wheels into $site"
  rm -rf "$partial"
  "$hostpy" "$repo/scripts/arm64/host.py" unpack "$wheels" "$partial"
  echo "$stamp" >"$partial/.stamp"
  rm -rf "$site"
  mv "$partial" "$site"
}

# 3. fedprune itself, from its wheel, unpacked into the site like its dependencies (replacing
# an earlier one). Without FEDPRUNE_WHEEL the wheel is built from this checkout (about 2 s).
install_fedprune() {
  local wheel=${FEDPRUNE_WHEEL:-} stamp
  if [ -z "$wheel" ]; then
    rm -rf "$cache/dist"
    "$hostpy" -m build --wheel --outdir "$cache/dist" "$repo" >"$cache/build.log" 2>&1 ||
      die "building fedprune's wheel failed (log: $cache/build.log)"
    wheel=$(echo "$cache"/dist/fedprune-*.whl)
  fi
  [ -f "$wheel" ] || die "no wheel at $wheel"
  stamp=$(sha256sum "$wheel" | cut -d' ' -f1)
  [ "$(cat "$site/.fedprune-wheel" 2>/dev/null)" = "$stamp" ] && return
  rm -rf "$site/fedprune" "$site"/fedprune-*.dist-info
  "$hostpy" -m zipfile -e "$wheel" "$site"
  echo "$stamp" >"$site/.fedprune-wheel"
}

# Sets arm=(...), the command line of the ARM python3.11, with extra PYTHONPATH entries if given.
# A clean environment: no host site or user packages, bytecode cached under the cache folder,
# whatever PYTHONDONTWRITEBYTECODE says on the host; PYTHONSAFEPATH keeps the current folder (the
# checkout, whose fedprune/ holds only the package's root) off the path.
arm_python() {
  local path=$site
  for extra in "$@"; do path+=:$extra; done
  arm=(env -u PYTHONHOME -u PYTHONSTARTUP -u PYTHONDONTWRITEBYTECODE -u VIRTUAL_ENV
    PYTHONSAFEPATH=1 PYTHONPATH="$path" PYTHONNOUSERSITE=1 PYTHONPYCACHEPREFIX="$pycache"
    FEDPRUNE_ARM64_CPU="$cpu" FEDPRUNE_ARM64_QEMU="$(command -v qemu-aarch64-static)" "$launcher")
}

# Byte-compile the standard library and the wheels once, under ARM Python itself: first imports
# under emulation otherwise cost seconds each time (about 5 s against 1.5 s for numpy + LiteRT).
compile_once() {
  local target=$1
  [ -f "$target/.fedprune-compiled" ] && return
  log "byte-compiling $target under emulation"
  arm_python
  "${arm[@]}" -m compileall -q -j 0 \
    -x '/python3\.11/(test|idlelib|tkinter|turtledemo|lib2to3)/|/tests?/' \
    "$target" >"$cache/compileall.log" 2>&1 || true
  touch "$target/.fedprune-compiled"
}

setup() {
  local started=$SECONDS
  need_tools
  (
    flock 9
    make_rootfs
    write_launcher
    write_cpuinfo
    make_wheels
    make_site
    compile_once "$rootfs/usr/lib/python3.11"
    compile_once "$site"
    install_fedprune
  ) 9>"$cache/.lock"
  if [ "${1:-}" = verbose ]; then
    arm_python
    log "ready in $((SECONDS - started)) s: $("${arm[@]}" -c 'import platform, sys
from importlib import metadata as m
print(platform.machine(), "Python", platform.python_version(), "| " + ", ".join(
    f"{p} {m.version(p)}" for p in ("fedprune", "numpy", "ai-edge-litert", "paho-mqtt", "msgpack")))')"
    log "qemu -cpu $cpu; disk: $(du -sh "$rootfs" | cut -f1) rootfs, $(du -sh "$wheels" | cut -f1) wheels," \
      "$(du -sh "$site" | cut -f1) site, $(du -sh "$pycache" 2>/dev/null | cut -f1) bytecode"
    log "run: $launcher (use scripts/arm64.sh python ...)"
  fi
}

run_tests() {
  local models=$cache/test-models started=$SECONDS
  if "$hostpy" -c 'import importlib.util as u, sys
sys.exit(not all(u.find_spec(m) for m in ("tensorflow", "tf_keras", "sklearn")))' 2>/dev/null; then
    (
      flock 9
      "$hostpy" "$repo/scripts/arm64/host.py" build-models "$models"
    ) 9>"$cache/.lock"
    export FEDPRUNE_TEST_MODELS=$models
    if ! grep -q FEDPRUNE_TEST_MODELS "$repo/tests/edge_client/conftest.py"; then
      export FEDPRUNE_ARM64_SKIP_MODELS="the 'models' fixture builds TFLite models with TensorFlow,\
 and tests/edge_client/conftest.py does not read FEDPRUNE_TEST_MODELS yet"
    fi
  else
    export FEDPRUNE_ARM64_SKIP_MODELS="the 'models' fixture needs TFLite models built with\
 TensorFlow, and the host Python ($hostpy) has no tensorflow/tf_keras/scikit-learn"
  fi
  cd "$repo"
  local code=0
  arm_python "$repo/scripts/arm64"
  # the host fuzzes the protocol's decoders with 2,000 inputs per test; 200 here (about 10x slower)
  FEDPRUNE_FUZZ_EXAMPLES=${FEDPRUNE_FUZZ_EXAMPLES:-200} "${arm[@]}" -m pytest -p no:cacheprovider \
    -p arm64_pytest tests/edge_client tests/protocol tests/device_profiles "$@" || code=$?
  log "edge tests under qemu ($cpu): exit $code after $((SECONDS - started)) s"
  return $code
}

command=${1:-}
[ $# -gt 0 ] && shift
case $command in
  setup)
    paths
    setup verbose
    ;;
  python)
    paths
    setup
    arm_python
    exec "${arm[@]}" "$@"
    ;;
  client)
    paths
    setup
    arm_python
    exec "${arm[@]}" -m fedprune.edge_client "$@"
    ;;
  test)
    paths
    setup
    run_tests "$@"
    ;;
  clean)
    paths
    log "removing $cache ($(du -sh "$cache" | cut -f1))"
    rm -rf "$cache"
    ;;
  *)
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
    exit 2
    ;;
esac
