#!/usr/bin/env bash
# P6 density on this machine's own /dev/kvm: N VMs started at once, each running a tiny guest
# (rvirt-testkit's `idle`: prints "ready" on COM1, then halts), until every guest has printed.
#   - rvirt-vmm started directly, N at once (console on a file)
#   - QEMU -M microvm with the same PVH ELF, N at once (console on a file)
#   - through rvirtd: N parallel `rvirt start` (returns once the VMM answers on its control socket)
# Guests are tiny on purpose: the figure is what the stack costs per VM (process, KVM set-up, guest
# memory, devices), which is what limits density; a Linux guest's own boot time would add the
# same to both VMMs. Prints a markdown table; never fails on timing.
#   N=20 bench/daemon/density.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${N:-20}
REPS=${REPS:-3}
cargo build --release -q -p rvirtd -p rvirt -p rvirt-vmm
cargo build --release -q -p rvirt-testkit --example write-guest
BIN=$PWD/target/release
WORK=$(mktemp -d)
SOCK=$WORK/sock
cleanup() {
    [[ -n "${DPID:-}" ]] && kill "$DPID" 2>/dev/null || true
    pkill -KILL -f "$WORK/" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
"$BIN/examples/write-guest" idle "$WORK/idle.elf"
now() { date +%s%N; }
ms() { echo "($2 - $1) / 1000000" | bc; }
cores=$(nproc)
LOAD=$(cut -d" " -f1-3 /proc/loadavg)

# wait_ready DIR — until every DIR/*.out holds "ready" (or 120 s).
wait_ready() {
    local deadline=$(($(date +%s) + 120)) n
    while :; do
        n=$( (grep -l ready "$1"/*.out 2>/dev/null || true) | wc -l)
        [[ "$n" -ge "$N" ]] && return 0
        [[ $(date +%s) -ge $deadline ]] && { echo "only $n of $N guests printed ready" >&2; return 1; }
        sleep 0.01
    done
}

# rss_mib PIDS... — summed RSS in MiB.
rss_mib() { ps -o rss= -p "$(echo "$@" | tr ' ' ',')" | awk '{s+=$1} END {printf "%.1f", s/1024}'; }

# One VM of each kind: launch_KIND I DIR starts VM I with its console in DIR/I.out.
launch_rvirt() {
    "$BIN/rvirt-vmm" --kernel "$WORK/idle.elf" --memory 64M --serial stdio --name "d$1" \
        </dev/null >"$2/$1.out" 2>"$2/$1.err" &
}
launch_qemu() {
    qemu-system-x86_64 -M microvm -accel kvm -cpu host,-arch-capabilities -m 64 -smp 1 \
        -nodefaults -no-user-config -display none -monitor none -serial "file:$2/$1.out" \
        -kernel "$WORK/idle.elf" </dev/null >"$2/$1.err" 2>&1 &
}

# direct KIND REP — N VMs of KIND at once; prints wall ms until all printed, and their RSS.
direct() {
    local d=$WORK/$1.$2 pids=() i t0 t1
    mkdir -p "$d"
    t0=$(now)
    for i in $(seq "$N"); do
        "launch_$1" "$i" "$d"
        pids+=($!)
    done
    wait_ready "$d"
    t1=$(now)
    echo "$(ms "$t0" "$t1") $(rss_mib "${pids[@]}")"
    kill "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
}

"$BIN/rvirtd" --socket "$SOCK" --state-dir "$WORK/state" --run-dir "$WORK/run" \
    --vmm-binary "$BIN/rvirt-vmm" 2>"$WORK/rvirtd.log" &
DPID=$!
disown "$DPID"
for _ in $(seq 100); do [[ -S "$SOCK" ]] && break; sleep 0.05; done
R() { "$BIN/rvirt" -c "$SOCK" "$@"; }
for i in $(seq "$N"); do
    printf "<domain type='kvm'><name>p%s</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type>hvm</type><kernel>%s</kernel></os><devices><serial type='pty'/><memballoon model='none'/></devices></domain>" \
        "$i" "$WORK/idle.elf" >"$WORK/p$i.xml"
    R define "$WORK/p$i.xml" >/dev/null
done
via_rvirtd() {
    local t0 t1 running
    t0=$(now)
    seq "$N" | xargs -P "$N" -I{} "$BIN/rvirt" -c "$SOCK" start p{} >/dev/null
    t1=$(now)
    running=$(R list --name | grep -c . || true)
    echo "$(ms "$t0" "$t1") $running"
    seq "$N" | xargs -P "$N" -I{} "$BIN/rvirt" -c "$SOCK" destroy p{} >/dev/null
}

per_core() { echo "scale=1; $N * 1000 / $1 / $cores" | bc; }
median() { sort -n | sed -n "$(((REPS + 1) / 2))p"; }
rv=() q=() d=() rvr=() qr=() drun=()
for r in $(seq "$REPS"); do
    read -r t m < <(direct rvirt "$r"); rv+=("$t"); rvr+=("$m")
    read -r t m < <(direct qemu "$r"); q+=("$t"); qr+=("$m")
    read -r t run < <(via_rvirtd); d+=("$t"); drun+=("$run")
done
rv_med=$(printf '%s\n' "${rv[@]}" | median)
q_med=$(printf '%s\n' "${q[@]}" | median)
d_med=$(printf '%s\n' "${d[@]}" | median)
echo
echo "load average before the run: $LOAD; $N VMs at once, 64 MiB, 1 vCPU, tiny 'idle' guest; median of $REPS"
echo
echo "| start $N at once, until every guest printed | wall ms (runs) | VMs/s/core | RSS of all $N VMMs (MiB) |"
echo "| --- | --- | --- | --- |"
echo "| rvirt-vmm, direct | $rv_med (${rv[*]}) | $(per_core "$rv_med") | ${rvr[*]} |"
echo "| QEMU -M microvm, direct | $q_med (${q[*]}) | $(per_core "$q_med") | ${qr[*]} |"
echo "| ratio QEMU / rvirt-vmm | $(echo "scale=2; $q_med / $rv_med" | bc)x | | |"
echo "| through rvirtd: $N parallel \`rvirt start\` returned (running after) | $d_med (${d[*]}) | $(per_core "$d_med") | (running: ${drun[*]}) |"
