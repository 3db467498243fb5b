#!/usr/bin/env bash
# Image benchmarks of issue #3, side by side with qemu-img in one run (never part of CI).
#   P4: convert throughput raw->qcow2, qcow2->raw, qcow2->qcow2 -c on a 2 GiB image half
#       filled with data, rvirt-img vs qemu-img, as a ratio (time_qemu / time_rvirt).
#   P5: random 4 KiB reads through the qcow2 backend vs the raw backend on the same data.
# usage: bench/image/run.sh [WORKDIR] [RUNS]      (prints a markdown table)
# Both tools convert the same source files; each measurement is the median of RUNS runs,
# the tools alternating, with a sync before every run so earlier write-back does not
# land on the next one.
set -euo pipefail
cd "$(dirname "$0")/../.."
work=${1:-$(mktemp -d)}
runs=${2:-3}
mkdir -p "$work"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/image}
cargo build -q --release -p rvirt-img -p rvirt-image --example randread
rv=$CARGO_TARGET_DIR/release/rvirt-img
randread=$CARGO_TARGET_DIR/release/examples/randread
command -v qemu-img >/dev/null || { echo "qemu-img is needed (scripts/install-deps)" >&2; exit 1; }

[ -f "$work/src.raw" ] || bench/image/mkdata.sh "$work/src.raw" 2G
[ -f "$work/src.qcow2" ] || qemu-img convert -O qcow2 "$work/src.raw" "$work/src.qcow2"

# seconds TOOL ARGS... : wall time of one run, output removed first.
seconds() {
  local out=${*: -1}
  rm -f "$out"
  sync
  local t0 t1
  t0=$(date +%s.%N)
  "$@" >/dev/null
  t1=$(date +%s.%N)
  echo "$t1 - $t0" | bc
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# case NAME OPTIONS... SRC: median seconds for qemu-img and rvirt-img.
case_row() {
  local name=$1
  shift
  local q=() r=()
  for ((i = 0; i < runs; i++)); do
    q+=("$(seconds qemu-img convert "$@" "$work/out.img")")
    r+=("$(seconds "$rv" convert "$@" "$work/out.img")")
  done
  local qm rm_
  qm=$(printf '%s\n' "${q[@]}" | median)
  rm_=$(printf '%s\n' "${r[@]}" | median)
  local mib=1024 # data bytes in the source: 1 GiB
  printf '| %s | %.2f s (%.0f MiB/s) | %.2f s (%.0f MiB/s) | %.2f× |\n' "$name" \
    "$qm" "$(echo "$mib / $qm" | bc -l)" "$rm_" "$(echo "$mib / $rm_" | bc -l)" \
    "$(echo "$qm / $rm_" | bc -l)"
}

echo "P4: convert, 2 GiB virtual, 1 GiB data (median of $runs runs)"
echo
echo "| conversion | qemu-img | rvirt-img | ratio (qemu time / rvirt time) |"
echo "|---|---|---|---|"
case_row "raw → qcow2" -f raw -O qcow2 "$work/src.raw"
case_row "qcow2 → raw" -f qcow2 -O raw "$work/src.qcow2"
case_row "qcow2 → qcow2 -c (zlib)" -f qcow2 -O qcow2 -c "$work/src.qcow2"
rm -f "$work/out.img"

# P5: 1 GiB of data everywhere, as raw and as qcow2, both in the page cache.
[ -f "$work/full.raw" ] || head -c $((768 << 20)) /dev/urandom | base64 -w 0 >"$work/full.raw"
[ -f "$work/full.qcow2" ] || qemu-img convert -O qcow2 "$work/full.raw" "$work/full.qcow2"
cat "$work/full.raw" "$work/full.qcow2" >/dev/null
echo
echo "P5: random 4 KiB reads, 1 GiB fully allocated, page cache warm (median of $runs runs)"
echo
echo "| threads | raw backend (reads/s) | qcow2 backend (reads/s) | ratio qcow2/raw |"
echo "|---|---|---|---|"
for threads in 1 2; do
  raw=() q=()
  for ((i = 0; i < runs; i++)); do
    raw+=("$("$randread" "$work/full.raw" 400000 "$threads")")
    q+=("$("$randread" "$work/full.qcow2" 400000 "$threads")")
  done
  rm_=$(printf '%s\n' "${raw[@]}" | median)
  qm=$(printf '%s\n' "${q[@]}" | median)
  printf '| %s | %s | %s | %.2f× |\n' "$threads" "$rm_" "$qm" "$(echo "$qm / $rm_" | bc -l)"
done
