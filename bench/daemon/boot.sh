#!/usr/bin/env bash
# Real-VM figures of rvirtd (issue #4): `rvirt start` → the VMM's vCPUs running, → the guest's
# /init (RVIRT-BOOTED on `rvirt console`), and density P6 (N guests started by parallel
# `rvirt start`, until every one printed RVIRT-BOOTED), with the real rvirt-vmm booting the
# Debian test guest inside one test host VM run (guest/testhost; 1 vCPU, so "per core" is per
# the test host's one core). Prints a Markdown table. Not a test: never gates CI.
#   REPS=3 N=5 MEM=128 bench/daemon/boot.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
REPS=${REPS:-3}
N=${N:-5}
MEM=${MEM:-128}
./scripts/install-deps
cargo build --release -q --bin rvirtd --bin rvirt --bin rvirt-vmm
bin=${CARGO_TARGET_DIR:-$PWD/target}/release
log=$(mktemp "${TMPDIR:-/tmp}/rvirt-bench-daemon.XXXXXX")
echo "bench: the test host's whole serial log goes to $log" >&2
guest/testhost run --scenario bench/daemon/boot-scenario.sh \
  --bin "$bin/rvirtd" --bin "$bin/rvirt" --bin "$bin/rvirt-vmm" \
  --append "rvirt.reps=$REPS rvirt.n=$N rvirt.mem=$MEM" --timeout 1200 |
  sed -u 's/\r//g' | tee "$log" | grep --line-buffered -E '^RVIRT-(BENCH|HOST|FAIL)' >&2 || true

awk -v n="$N" '
  function median(s,   k, i, j, t, a) {
    k = split(s, a, " ")
    if (k == 0) return "n/a"
    for (i = 2; i <= k; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > t + 0; j--) a[j + 1] = a[j]; a[j + 1] = t }
    return (k % 2) ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2
  }
  $1 == "RVIRT-BENCH" {
    delete f
    for (i = 3; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
    if ($2 == "start") {
      st = st " " f["start_ms"]; bo = bo " " f["booted_ms"]
      if (f["vmm_boot_timer_ms"] != "none") bt = bt " " f["vmm_boot_timer_ms"]
      reps++
    }
    if ($2 == "density") { ds = f["starts_ms"]; db = f["all_booted_ms"] }
  }
  END {
    print "| figure | value |"
    print "| --- | --- |"
    printf "| `rvirt start` → VMM vCPUs running and control socket answering, median of %d | %s ms |\n", reps, median(st)
    printf "| `rvirt start` → RVIRT-BOOTED on `rvirt console`, median of %d | %s ms |\n", reps, median(bo)
    printf "| VMM exec → guest /init (VMM boot-timer port), median of %d | %s ms |\n", reps, median(bt)
    if (db != "") {
      printf "| %d parallel `rvirt start`, all returned | %s ms |\n", n, ds
      printf "| %d parallel `rvirt start`, all guests at RVIRT-BOOTED | %s ms |\n", n, db
      printf "| P6 density: VMs booted per core per second (1-vCPU test host) | %.2f |\n", n / (db / 1000)
    } else {
      print "| P6 density | no result (see the test host log) |"
    }
  }' "$log"
