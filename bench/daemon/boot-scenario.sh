# Test host side of bench/daemon/boot.sh: rvirtd + rvirt + the real rvirt-vmm booting the test
# guest. Prints RVIRT-BENCH lines:
#   RVIRT-BENCH start rep=I start_ms=A booted_ms=B vmm_boot_timer_ms=C
#     A: `rvirt start` (CLI exec → rvirtd spawns the VMM → its vCPU threads run and its control
#        socket answers) — an upper bound of `rvirt start` → first guest instruction;
#     B: `rvirt start` → RVIRT-BOOTED on `rvirt console` (guest /init reached);
#     C: the VMM's own boot-timer line (VMM exec → the guest's /init writes the boot-timer port).
#   RVIRT-BENCH density n=N starts_ms=A all_booted_ms=B
#     N domains started by N parallel `rvirt start`: A until every start returned, B until every
#     guest printed RVIRT-BOOTED.
# Arguments: rvirt.reps=R (sequential starts, default 3), rvirt.n=N (parallel starts, default 5),
# rvirt.mem=MIB (default 128).
. /lib/rvirt/scenario.sh
reps=$(arg reps) || reps=3
n=$(arg n) || n=5
mem=$(arg mem) || mem=128
export RVIRT_SOCKET=/run/rvirt/rvirtd.sock
rvirtd --socket "$RVIRT_SOCKET" --state-dir /var/lib/rvirt --run-dir /run/rvirt >/tmp/rvirtd.log 2>&1 &
daemon=$!
i=0
while ! rvirt list >/dev/null 2>&1; do
  i=$((i + 1))
  [ $i -gt 100 ] && { fail bench.daemon "rvirtd did not answer"; exit 1; }
  sleep 0.1
done
mkfifo /tmp/console.in

define() {
  cat >"/tmp/$1.xml" <<EOF
<domain type='kvm'>
  <name>$1</name>
  <memory unit='MiB'>$mem</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64'>hvm</type>
    <kernel>$GUEST_VMLINUX</kernel>
    <initrd>$GUEST_INITRD</initrd>
    <cmdline>$GUEST_CMDLINE rvirt.bootport=0x440 rvirt.sleep=600</cmdline>
  </os>
  <devices>
    <serial type='pty'><target port='0'/></serial>
  </devices>
</domain>
EOF
  rvirt define "/tmp/$1.xml" >/dev/null || fail "bench.define.$1" "rvirt define failed"
}

booted() { grep -q '^RVIRT-BOOTED' "/tmp/$1.con" 2>/dev/null; }

define s1
r=1
while [ $r -le "$reps" ]; do
  : >/tmp/s1.con
  t0=$(now_ms)
  rvirt start s1 >/dev/null || fail bench.start "rvirt start s1 failed"
  t1=$(now_ms)
  rvirt console s1 <>/tmp/console.in >/tmp/s1.con 2>&1 &
  con=$!
  k=0
  while ! booted s1 && [ $k -lt 1200 ]; do sleep 0.05; k=$((k + 1)); done
  t2=$(now_ms)
  booted s1 || fail bench.boot "s1 did not boot in 60 s"
  timer=$(grep 'boot-timer:' /var/lib/rvirt/log/s1.log | tail -n 1 | sed 's/.*boot-timer: \([0-9.]*\) ms.*/\1/')
  echo "RVIRT-BENCH start rep=$r start_ms=$((t1 - t0)) booted_ms=$((t2 - t0)) vmm_boot_timer_ms=${timer:-none}"
  rvirt destroy s1 >/dev/null
  kill $con 2>/dev/null
  wait $con 2>/dev/null
  r=$((r + 1))
done

i=1
while [ $i -le "$n" ]; do define "p$i"; i=$((i + 1)); done
t0=$(now_ms)
i=1
while [ $i -le "$n" ]; do
  (
    if out=$(rvirt start "p$i" 2>&1); then
      echo >"/tmp/p$i.started"
    else
      fail "bench.start.p$i" "$(echo "$out" | tr '\n' ' ')"
      echo >"/tmp/p$i.failed"
    fi
  ) &
  i=$((i + 1))
done
# Consoles attach as soon as each start returns (no output is kept before that; /init comes
# seconds later).
pending=$n
tstarts=
attached=
while [ $(($(now_ms) - t0)) -lt 150000 ]; do
  pending=0
  i=1
  while [ $i -le "$n" ]; do
    if [ -f "/tmp/p$i.started" ]; then
      case " $attached " in
        *" $i "*) ;;
        *)
          rvirt console "p$i" <>/tmp/console.in >"/tmp/p$i.con" 2>&1 &
          attached="$attached $i"
          ;;
      esac
      booted "p$i" || pending=$((pending + 1))
    else
      pending=$((pending + 1))
    fi
    i=$((i + 1))
  done
  # shellcheck disable=SC2086
  [ -z "$tstarts" ] && [ "$(set -- $attached; echo $#)" = "$n" ] && tstarts=$(($(now_ms) - t0))
  [ $pending = 0 ] && break
  ls /tmp/p*.failed >/dev/null 2>&1 && break
  sleep 0.05
done
tall=$(($(now_ms) - t0))
if [ $pending = 0 ]; then
  echo "RVIRT-BENCH density n=$n starts_ms=$tstarts all_booted_ms=$tall"
else
  fail bench.density "$pending of $n guests did not start and boot within 150 s"
fi
i=1
while [ $i -le "$n" ]; do rvirt destroy "p$i" >/dev/null; i=$((i + 1)); done
kill "$daemon"
sed 's/^/rvirtd| /' /tmp/rvirtd.log | tail -n 20
