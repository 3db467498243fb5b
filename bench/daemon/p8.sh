#!/usr/bin/env bash
# P8: daemon and CLI figures.
#   - `rvirt list --all` with N defined domains (goal: <= 50 ms at N=1000)
#   - define rate through the CLI (one process per define, as a script would do) and through
#     parallel API clients
#   - `rvirt start` -> VMM control socket answering, and parallel start density
# The VMM here is rvirt-fake-vmm (no guest): the start figures are the daemon's own overhead,
# not a guest boot. Prints a markdown table; never fails on timing.
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${N:-1000}
PAR=${PAR:-20}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/daemon}
cargo build --release -q -p rvirtd -p rvirt
BIN=$CARGO_TARGET_DIR/release
WORK=$(mktemp -d)
SOCK=$WORK/sock
cleanup() {
    [[ -n "${DPID:-}" ]] && kill "$DPID" 2>/dev/null || true
    for f in "$WORK"/run/*/vmm.json; do
        [[ -f "$f" ]] && kill -9 "$(sed 's/.*"pid":\([0-9]*\).*/\1/' "$f")" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
: > "$WORK/vmlinux"
: > "$WORK/disk.img"
"$BIN/rvirtd" --socket "$SOCK" --state-dir "$WORK/state" --run-dir "$WORK/run" \
    --vmm-binary "$BIN/rvirt-fake-vmm" 2> "$WORK/rvirtd.log" &
DPID=$!
for _ in $(seq 100); do [[ -S "$SOCK" ]] && break; sleep 0.05; done
R() { "$BIN/rvirt" -c "$SOCK" "$@"; }
LOAD=$(cut -d" " -f1-3 /proc/loadavg)
xml() {
    printf "<domain type='kvm'><name>%s</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type>hvm</type><kernel>%s</kernel></os><devices><disk type='file'><source file='%s'/><target dev='vda' bus='virtio'/></disk></devices></domain>" \
        "$1" "$WORK/vmlinux" "$WORK/disk.img"
}
now() { date +%s%N; }
ms() { echo "scale=2; ($2 - $1) / 1000000" | bc; }

# Define rate through the CLI, one process per domain (first 200).
CLI_N=200
for i in $(seq 1 $CLI_N); do xml "cli$i" > "$WORK/cli$i.xml"; done
t0=$(now)
for i in $(seq 1 $CLI_N); do R define "$WORK/cli$i.xml" > /dev/null; done
t1=$(now)
cli_rate=$(echo "scale=0; $CLI_N * 1000 / $(ms "$t0" "$t1")" | bc)

# The rest through parallel API clients (8 threads, one request per connection).
rest=$((N - CLI_N))
api_rate=$(python3 bench/daemon/define_api.py "$SOCK" "$rest" 8 "$WORK/vmlinux" "$WORK/disk.img")
count=$(R list --all --name | grep -c . || true)

# rvirt list --all: median of 21 runs.
R list --all > /dev/null
times=()
for _ in $(seq 21); do
    t0=$(now); R list --all > /dev/null; t1=$(now)
    times+=("$(ms "$t0" "$t1")")
done
list_med=$(printf '%s\n' "${times[@]}" | sort -n | sed -n 11p)
list_max=$(printf '%s\n' "${times[@]}" | sort -n | tail -1)
list_json=$( { t0=$(now); R list --all --json > /dev/null; t1=$(now); ms "$t0" "$t1"; } )

# API round trips (no CLI process): one domain, and the whole list.
read -r one50 one99 all50 all99 < <(python3 bench/daemon/api_latency.py "$SOCK" cli1 500)

# rvirt start -> VMM answering on its control socket (the CLI returns when it does).
st=()
for i in $(seq 1 10); do
    t0=$(now); R start "cli$i" > /dev/null; t1=$(now)
    st+=("$(ms "$t0" "$t1")")
    R destroy "cli$i" > /dev/null
done
start_med=$(printf '%s\n' "${st[@]}" | sort -n | sed -n 5p)

# Density: PAR domains started in parallel.
t0=$(now)
seq 11 $((10 + PAR)) | xargs -P "$PAR" -I{} "$BIN/rvirt" -c "$SOCK" start cli{} > /dev/null
t1=$(now)
par_ms=$(ms "$t0" "$t1")
running=$(R list --name | grep -c . || true)
cores=$(nproc)
density=$(echo "scale=1; $PAR * 1000 / $par_ms / $cores" | bc)
seq 11 $((10 + PAR)) | xargs -P "$PAR" -I{} "$BIN/rvirt" -c "$SOCK" destroy cli{} > /dev/null

echo
echo "load average before the run: $LOAD"
echo
echo "| figure | value |"
echo "| --- | --- |"
echo "| domains defined | $count |"
echo "| \`rvirt list --all\`, $count domains, median of 21 (max) | ${list_med} ms (${list_max} ms) |"
echo "| \`rvirt list --all --json\`, $count domains | ${list_json} ms |"
echo "| API GET /v1/domains/NAME, p50 / p99 of 500 | ${one50} / ${one99} ms |"
echo "| API GET /v1/domains ($count), p50 / p99 of 500 | ${all50} / ${all99} ms |"
echo "| define rate, \`rvirt define FILE\` one process each | ${cli_rate} /s |"
echo "| define rate, API, 8 parallel clients | ${api_rate} /s |"
echo "| \`rvirt start\` -> VMM control socket answering (fake VMM), median of 10 | ${start_med} ms |"
echo "| $PAR starts in parallel (fake VMM): wall time; running after | ${par_ms} ms; $running |"
echo "| start density (fake VMM) | ${density} VMs/s/core ($cores cores) |"
