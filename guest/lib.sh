# Shared helpers of the guest fixture scripts. Sourced, not run.
#
# Every fixture is built into "$RVIRT_CACHE/<name>-<hash>" where <hash> covers the recipe: the
# scripts that build it, the inputs they name (Debian package versions) and the fixtures it is
# built from. A fixture directory only appears once complete (built in a temp dir, then renamed),
# so an interrupted build is redone, never half-used.

set -euo pipefail

RVIRT_CACHE=${RVIRT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rvirt}
GUEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

log() { echo "guest: $*" >&2; }
die() { echo "guest: error: $*" >&2; exit 1; }

need() {
  local c
  for c in "$@"; do
    command -v "$c" >/dev/null || die "'$c' is missing; run ./scripts/install-deps"
  done
}

# recipe_hash STRING... — short hash of the given strings (file contents are passed by the caller).
recipe_hash() {
  printf '%s\n' "$@" | sha256sum | cut -c1-16
}

# file_digest FILE... — contents digest of files, for recipe hashes.
file_digest() {
  cat "$@" | sha256sum | cut -c1-64
}

# apt_update_once — apt-cache/apt-get download need package lists; fetch them once per boot of
# the machine (or when they are absent).
apt_update_once() {
  local stamp=/var/lib/apt/lists/partial/.rvirt-updated
  if [ ! -e "$stamp" ] || [ -z "$(ls /var/lib/apt/lists/*_Packages 2>/dev/null | head -1)" ]; then
    log "apt-get update"
    apt-get update -qq >&2 || die "apt-get update failed"
    touch "$stamp" 2>/dev/null || true
  fi
}

# apt_fetch PACKAGE DIR — download exactly PACKAGE's .deb into DIR and print its path.
apt_fetch() {
  local pkg=$1 dir=$2
  (cd "$dir" && apt-get download -q "$pkg" >&2 2>/dev/null) || {
    apt_update_once
    (cd "$dir" && apt-get download -q "$pkg" >&2) || die "apt-get download $pkg failed"
  }
  ls "$dir"/"${pkg}"_*.deb | head -1
}

# candidate_version PACKAGE — the version apt would download, for recipe hashes.
candidate_version() {
  local v
  v=$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}')
  if [ -z "$v" ] || [ "$v" = "(none)" ]; then
    apt_update_once
    v=$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}')
  fi
  [ -n "$v" ] && [ "$v" != "(none)" ] || die "no Debian package named $1 (check the apt sources)"
  echo "$v"
}

# begin_fixture NAME HASH — sets FIXTURE (final dir) and WORK (temp dir); returns 1 if FIXTURE
# already exists (nothing to build).
begin_fixture() {
  FIXTURE_NAME=$1
  FIXTURE="$RVIRT_CACHE/$1-$2"
  [ -d "$FIXTURE" ] && return 1
  mkdir -p "$RVIRT_CACHE"
  WORK=$(mktemp -d "$RVIRT_CACHE/.$1-$2.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
  return 0
}

# finish_fixture — publish WORK as FIXTURE atomically.
finish_fixture() {
  trap - EXIT
  chmod -R a+rX "$WORK"
  if ! mv -T "$WORK" "$FIXTURE" 2>/dev/null; then
    # Someone else finished the same recipe first; theirs is as good as ours.
    rm -rf "$WORK"
  fi
  # Older recipes of the same fixture are dead weight (a kernel is ~80 MB).
  local old
  for old in "$RVIRT_CACHE/$FIXTURE_NAME"-*; do
    [ "$old" = "$FIXTURE" ] || rm -rf "$old"
  done
}

# module_order DIR NAME... — NAME and their dependencies (from `modinfo -F depends` of the .ko
# files in DIR), each once, dependencies first. Module names may use '-' or '_' interchangeably.
module_order() {
  local dir=$1; shift
  local -A seen=()
  local out=()
  _visit() {
    local n=${1//-/_} f d
    [ -n "${seen[$n]:-}" ] && return 0
    seen[$n]=1
    f=$(_module_file "$dir" "$n") || die "module $n not found in $dir"
    for d in $(modinfo -F depends "$f" | tr ',' ' '); do
      _visit "$d"
    done
    out+=("$(basename "$f" .ko)")
  }
  local m
  for m in "$@"; do _visit "$m"; done
  printf '%s\n' "${out[@]}"
}

_module_file() {
  local dir=$1 n=$2 f
  for f in "$dir/$n.ko" "$dir/${n//_/-}.ko"; do
    [ -e "$f" ] && { echo "$f"; return 0; }
  done
  return 1
}

# make_cpio DIR OUT — uncompressed newc archive of DIR's contents, owned by root.
make_cpio() {
  (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$2"
}

# install_busybox BUSYBOX ROOT — BUSYBOX as ROOT/bin/busybox with a symlink per applet.
install_busybox() {
  local a
  mkdir -p "$2/bin"
  install -m 0755 "$1" "$2/bin/busybox"
  for a in $("$1" --list); do
    [ "$a" = busybox ] || ln -sf busybox "$2/bin/$a"
  done
}
