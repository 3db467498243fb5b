# Helpers for scenario scripts run inside the test host VM (busybox sh). Installed at
# /lib/rvirt/scenario.sh; a scenario starts with `. /lib/rvirt/scenario.sh`.
#
# Result protocol (one line each on the test host's serial console, parsed by the rvirt-tests
# harness):
#   RVIRT-PASS <name> [detail]
#   RVIRT-FAIL <name> <reason>
#   RVIRT-TIME <name> <milliseconds>
#   <tag>| <line>              a line of a guest's serial console, run by run_guest <tag>
# Names are "<tag>.<check>" for results derived from a guest run.

GUEST_VMLINUX=/guest/vmlinux
GUEST_BZIMAGE=/guest/bzImage
GUEST_INITRD=/guest/initramfs.cpio
# Quiet serial: each character is a trapped I/O write, which costs tens of microseconds here.
GUEST_CMDLINE="console=ttyS0 quiet loglevel=0 panic=-1"

# arg NAME — VALUE of rvirt.NAME=VALUE on the test host's command line (Scenario::arg); fails if
# absent.
arg() {
  for w in $(cat /proc/cmdline); do
    case "$w" in "rvirt.$1="*) echo "${w#*=}"; return 0 ;; esac
  done
  return 1
}

pass() { echo "RVIRT-PASS $*"; }
fail() { echo "RVIRT-FAIL $*"; }

# now_ms — milliseconds since the test host booted (10 ms resolution).
now_ms() { awk '{ printf "%d", $1 * 1000 }' /proc/uptime; }

# make_tap NAME ADDR/PREFIX — a TAP device with the test host's end of the guest network.
make_tap() {
  tunctl -t "$1" >/dev/null && ip addr add "$2" dev "$1" && ip link set "$1" up
}

# make_disk PATH MIB TOKEN — a raw disk of MIB MiB whose first bytes are TOKEN (see the guest's
# blk check, which then writes "RVIRT-BLK-OUT:TOKEN" at byte 4096).
make_disk() {
  dd if=/dev/zero of="$1" bs=1048576 count=0 seek="$2" 2>/dev/null &&
    printf '%s' "$3" | dd of="$1" conv=notrunc 2>/dev/null
}

# initrd_with_test SCRIPT OUT — OUT is the guest initramfs plus SCRIPT as /etc/rvirt/test.sh, which
# the guest's /init sources after its checks (pass/fail/arg available there). Prints OUT.
initrd_with_test() {
  d=$(mktemp -d)
  mkdir -p "$d/etc/rvirt"
  cp "$1" "$d/etc/rvirt/test.sh"
  (cd "$d" && find etc | cpio -o -H newc 2>/dev/null) >"$d.cpio" &&
    cat "$GUEST_INITRD" "$d.cpio" >"$2"
  rc=$?
  rm -rf "$d" "$d.cpio"
  [ $rc = 0 ] && echo "$2"
}

# check_disk NAME PATH TOKEN — the test host reads back what the guest wrote.
check_disk() {
  want="RVIRT-BLK-OUT:$3"
  got=$(dd if="$2" bs=1 skip=4096 count=${#want} 2>/dev/null)
  if [ "$got" = "$want" ]; then pass "$1" "$2 holds '$want'"; else fail "$1" "$2 holds '$got', want '$want'"; fi
}

# run_guest TAG TIMEOUT CMD... — run a VMM (or any command) with its console on stdout, tag its
# lines, and report: TAG.<check> for each RVIRT-PASS/FAIL line of the guest, TAG.done (the guest
# printed RVIRT-DONE), TAG.exit (CMD exited 0 within TIMEOUT seconds), RVIRT-TIME TAG.
# Returns CMD's exit status.
run_guest() {
  tag=$1 limit=$2
  shift 2
  t0=$(now_ms)
  { timeout "$limit" "$@" </dev/null 2>&1; echo $? >"/tmp/$tag.rc"; } |
    tr -d '\r' | tee "/tmp/$tag.log" | sed "s/^/$tag| /"
  rc=$(cat "/tmp/$tag.rc")
  ms=$(($(now_ms) - t0))
  echo "RVIRT-TIME $tag $ms"
  grep -E '^RVIRT-(PASS|FAIL) ' "/tmp/$tag.log" | while read -r kind check rest; do
    if [ "$kind" = RVIRT-PASS ]; then pass "$tag.$check" "$rest"; else fail "$tag.$check" "$rest"; fi
  done
  if grep -q '^RVIRT-DONE ' "/tmp/$tag.log"; then
    pass "$tag.done"
  else
    fail "$tag.done" "the guest never printed RVIRT-DONE"
  fi
  if [ "$rc" = 0 ]; then
    pass "$tag.exit"
  elif [ "$ms" -ge $((limit * 1000)) ]; then
    fail "$tag.exit" "timed out after ${limit}s"
  else
    fail "$tag.exit" "exit status $rc"
  fi
  return "$rc"
}
