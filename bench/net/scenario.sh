# bench/net's scenario, run inside the test host VM: TCP throughput over virtio-net on rvirtd's NAT
# bridge (the `default` network: bridge, dnsmasq, nftables masquerade), for a pair of rvirt-vmm
# guests and then a pair of QEMU guests (-enable-kvm -cpu host, virtio-net-pci on a TAP, vhost
# off: both VMMs move packets in their own process), same kernel, initramfs, bridge and TAPs.
#   guest->host   the test host downloads the big file from guest A (busybox wget <- httpd)
#   guest->guest  guest B downloads it from guest A (its /cgi-bin/pull, triggered by the host)
# Each transfer moves rvirt.reps x rvirt.bigmib MiB. Host CPU is utime+stime of the VMM
# process(es) involved (/proc/PID/stat) over the transfer, per GB moved.
# Output: RVIRT-BENCH <vmm> <case> bytes=N ms=M cpu_ms=C
. /lib/rvirt/scenario.sh
IP=/usr/sbin/ip
reps=$(arg reps) || reps=4
mib=$(arg bigmib) || mib=32
mkdir -p /var/lib/rvirt /run/rvirt /tmp/b

rvirtd >/tmp/b/rvirtd.log 2>&1 &
RVIRTD=$!
n=0
while ! rvirt list >/dev/null 2>&1 && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
rvirt net-start default >/dev/null || { fail bench.net "net-start default: $(tail -n 3 /tmp/b/rvirtd.log)"; exit 1; }
br=$(rvirt net-info default | awk '/^Bridge:/ {print $2}')
initrd_with_test /bench/guest.sh /tmp/b/initrd.cpio >/dev/null || { fail bench.initrd "cannot build"; exit 1; }
cmd="$GUEST_CMDLINE rvirt.check=net rvirt.net=dhcp rvirt.bigmib=$mib rvirt.reps=$reps rvirt.sleep=900"

# ticks PID — utime + stime of PID in clock ticks (fields 14 and 15).
ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
hz=100

# vm VMM NAME TAP MAC — starts a guest in the background (console in /tmp/b/NAME.log); sets PID.
vm() {
  vmm=$1 name=$2 tap=$3 mac=$4
  tunctl -t "$tap" >/dev/null && $IP link set "$tap" master "$br" && $IP link set "$tap" up ||
    fail "bench.$name.tap" "cannot put $tap on $br"
  case "$vmm" in
    rvirt-vmm)
      rvirt-vmm --kernel "$GUEST_VMLINUX" --initrd /tmp/b/initrd.cpio \
        --cmdline "$cmd rvirt.hostname=$name" --memory 256M --cpus 1 --net "tap=$tap,mac=$mac" \
        --serial stdio </dev/null >"/tmp/b/$name.log" 2>&1 &
      ;;
    qemu)
      qemu-system-x86_64 -M pc -enable-kvm -cpu host -smp 1 -m 256 -nodefaults -no-user-config \
        -no-reboot -display none -serial stdio -kernel "$GUEST_VMLINUX" -initrd /tmp/b/initrd.cpio \
        -append "$cmd rvirt.hostname=$name" \
        -netdev "tap,id=n0,ifname=$tap,script=no,downscript=no,vhost=off" \
        -device "virtio-net-pci,netdev=n0,mac=$mac,romfile=" </dev/null >"/tmp/b/$name.log" 2>&1 &
      ;;
  esac
  PID=$!
}

# ready NAME — waits for the guest's RVIRT-READY line (240 s); prints its address.
ready() {
  n=0
  while ! grep -q '^RVIRT-READY' "/tmp/b/$1.log" && [ $n -lt 2400 ]; do sleep 0.1; n=$((n + 1)); done
  tr -d '\r' <"/tmp/b/$1.log" | sed -n 's/^RVIRT-READY \([0-9.]*\).*/\1/p' | head -n1
}

for v in rvirt-vmm qemu; do
  if [ "$v" = qemu ] && ! command -v qemu-system-x86_64 >/dev/null; then
    echo "RVIRT-BENCH qemu unavailable"
    continue
  fi
  # One after the other: two boots at once on the test host's one vCPU only slow both down.
  vm "$v" "a-$v" bt0 52:54:00:be:00:01
  pa=$PID
  ipa=$(ready "a-$v")
  vm "$v" "b-$v" bt1 52:54:00:be:00:02
  pb=$PID
  ipb=$(ready "b-$v")
  if [ -z "$ipa" ] || [ -z "$ipb" ]; then
    fail "bench.$v" "guests not ready (a='$ipa' b='$ipb'): a: $(tail -n 5 /tmp/b/a-$v.log | tr '\r\n' '  ') b: $(tail -n 5 /tmp/b/b-$v.log | tr '\r\n' '  ')"
  else
    pass "bench.$v.ready" "a=$ipa b=$ipb"
    # guest -> host: the test host downloads from guest A.
    c0=$(ticks $pa)
    t0=$(now_ms)
    i=0
    while [ $i -lt "$reps" ]; do wget -O /dev/null "http://$ipa:8080/big" 2>/dev/null || break; i=$((i + 1)); done
    t1=$(now_ms)
    c1=$(ticks $pa)
    echo "RVIRT-BENCH $v guest-to-host bytes=$((i * mib * 1048576)) ms=$((t1 - t0)) cpu_ms=$(((c1 - c0) * 1000 / hz))"
    # guest -> guest: guest B downloads from guest A; both VMMs' CPU counts.
    c0=$(($(ticks $pa) + $(ticks $pb)))
    t0=$(now_ms)
    r=$(wget -O - "http://$ipb:8080/cgi-bin/pull?$ipa" 2>/dev/null | tr -d '\r' | grep '^bytes=')
    t1=$(now_ms)
    c1=$(($(ticks $pa) + $(ticks $pb)))
    echo "RVIRT-BENCH $v guest-to-guest $r host_ms=$((t1 - t0)) cpu_ms=$(((c1 - c0) * 1000 / hz))"
  fi
  kill $pa $pb 2>/dev/null
  wait $pa $pb 2>/dev/null
  $IP link del bt0
  $IP link del bt1
done
rvirt net-destroy default >/dev/null
kill $RVIRTD
