# Live resources end to end: rvirtd + rvirt + rvirt-vmm with the Debian guest in the test host.
#   balloon: `info balloon` shows the boot size; `balloon N` takes memory from the guest (its
#   MemTotal drops) and gives it back to the host (the VMM's RSS drops); dommemstat shows the
#   guest's statistics; setmem deflates it again. Free page reporting: memory the guest frees goes
#   back to the host without any request. vCPUs: setvcpus --live adds a vCPU the guest onlines and
#   runs work on, and removes it again (the guest ejects it). Disks: attach-disk of a qcow2 image
#   appears in the guest as /dev/vdb without a rescan, detach-disk removes it and releases the
#   image lock. NICs: attach-interface on the NAT network gets a DHCP lease in the guest.
# The guest side is live-guest.sh (its RVIRT-LIVE lines); commands reach it on the serial console.
# Arguments: rvirt.mem=MIB (guest memory, default 384).
. /lib/rvirt/scenario.sh
mem=$(arg mem) || mem=384
export RVIRT_SOCKET=/run/rvirt/rvirtd.sock
STATE=/var/lib/rvirt
RUN=/run/rvirt
. /scenarios/daemon-lib.sh
. /scenarios/live-lib.sh

# domain NAME BALLOON-ATTRS — /tmp/NAME.xml (see live_domain_xml).
domain() { live_domain_xml "$1" "$mem" "$2"; }

# say NAME TEXT — types TEXT on NAME's serial console (the background `rvirt console`).
say() { echo "$2" >/tmp/console.in; }

balloon_mib() { rvirt qemu-monitor-command "$1" --hmp --cmd 'info balloon' 2>&1 | sed -n 's/^balloon: actual=\([0-9]*\)$/\1/p'; }

wait_balloon() {
  n=0
  while [ $n -lt $(($3 * 10)) ]; do
    [ "$(balloon_mib "$1")" = "$2" ] && return 0
    sleep 0.1
    n=$((n + 1))
  done
  return 1
}

boot() {
  run rvirt start "$1" || fail "$1.start" "$out"
  console_on "$1"
  if wait_console "$1" '^RVIRT-PASS live' 120; then
    pass "$1.boot" "the guest reports its resources"
  else
    fail "$1.boot" "no RVIRT-PASS live within 120 s"
    dump_logs
    exit 1
  fi
}

if start_daemon; then pass daemon.up; else fail daemon.up "rvirtd did not answer"; dump_logs; exit 1; fi
LIVE_INITRD=$(initrd_with_test /scenarios/live-guest.sh /tmp/live-initrd.cpio) ||
  { fail initrd "cannot build the live test initramfs"; exit 1; }
# The NAT network the hot-added NIC joins (rvirtd defines `default` at its first start).
check net.start rvirt net-start default

# ---- balloon ---------------------------------------------------------------------------------

domain vm1 ""
check define rvirt define /tmp/vm1.xml
boot vm1
pid=$(field vm1 pid)
if [ "$(balloon_mib vm1)" = "$mem" ]; then
  pass balloon.info "balloon: actual=$mem"
else
  fail balloon.info "info balloon: $(rvirt qemu-monitor-command vm1 --hmp --cmd 'info balloon' 2>&1)"
fi
wait_live vm1 mem true 10
mem0=$(live_value vm1 mem)
# Touch 200 MiB of guest memory and free it again: the host now backs it.
say vm1 "RVIRT-CMD alloc 200"
wait_console vm1 '^RVIRT-LIVE alloc 200' 60 || fail balloon.touch "the guest did not fill 200 MiB"
say vm1 "RVIRT-CMD free"
wait_console vm1 '^RVIRT-LIVE free' 30 || fail balloon.touch "the guest did not free it"
rss0=$(rss_kb "$pid")
target=$((mem - 200))
t0=$(now_ms)
check balloon.set rvirt qemu-monitor-command vm1 --hmp --cmd "balloon $target"
if wait_balloon vm1 "$target" 90; then
  echo "RVIRT-TIME balloon-inflate-200MiB $(($(now_ms) - t0))"
  pass balloon.inflate "info balloon: actual=$target after $(($(now_ms) - t0)) ms"
else
  fail balloon.inflate "info balloon says $(balloon_mib vm1), want $target"
fi
if wait_live vm1 mem '[ $((mem0 - v)) -ge $((190 * 1024)) ]' 30; then
  pass balloon.guest "MemTotal $mem0 -> $(live_value vm1 mem) kB"
else
  fail balloon.guest "MemTotal $mem0 -> $(live_value vm1 mem) kB, want 190 MiB less"
fi
rss1=$(rss_kb "$pid")
if [ $((rss0 - rss1)) -ge $((150 * 1024)) ]; then
  pass balloon.rss "VMM RSS $rss0 -> $rss1 kB"
else
  fail balloon.rss "VMM RSS $rss0 -> $rss1 kB, want 150 MiB less"
fi
sleep 3
run rvirt dommemstat vm1
if echo "$out" | grep -q "^actual $((target * 1024))$" && echo "$out" | grep -q '^unused [1-9]' &&
  echo "$out" | grep -q '^last_update [1-9]'; then
  pass balloon.stats "$(echo "$out" | tr '\n' ' ')"
else
  fail balloon.stats "dommemstat: $(echo "$out" | tr '\n' ' ')"
fi
check balloon.setmem rvirt setmem vm1 "${mem}M" --live
if wait_balloon vm1 "$mem" 60 && wait_live vm1 mem "[ \$v -ge $((mem0 - 1024)) ]" 30; then
  pass balloon.deflate "actual=$mem, MemTotal $(live_value vm1 mem) kB"
else
  fail balloon.deflate "actual=$(balloon_mib vm1), MemTotal $(live_value vm1 mem) kB"
fi

# ---- vCPU hotplug ----------------------------------------------------------------------------

t0=$(now_ms)
check vcpu.set rvirt setvcpus vm1 2 --live
if wait_live vm1 cpus '[ "$v" = 2 ]' 60; then
  echo "RVIRT-TIME setvcpus-add-to-guest $(($(now_ms) - t0))"
  pass vcpu.add "the guest has 2 CPUs online after $(($(now_ms) - t0)) ms"
else
  fail vcpu.add "the guest has $(live_value vm1 cpus) CPUs online"
fi
run rvirt vcpucount vm1
if echo "$out" | grep -q '^current *live *2$'; then pass vcpu.count "$(echo "$out" | tr -s ' \n' ' ')"; else fail vcpu.count "$out"; fi
say vm1 "RVIRT-CMD spin 1"
if wait_live vm1 spin '[ "${v%% *}" = 1 ] && [ "${v#* }" -gt 0 ]' 120; then
  pass vcpu.work "CPU 1 ran the work: $(live_value vm1 spin) ticks"
else
  fail vcpu.work "spin on CPU 1: '$(live_value vm1 spin)'"
fi
t0=$(now_ms)
check vcpu.unset rvirt setvcpus vm1 1 --live
if wait_live vm1 cpus '[ "$v" = 1 ]' 60; then
  echo "RVIRT-TIME setvcpus-remove-to-guest $(($(now_ms) - t0))"
  pass vcpu.remove "the guest has 1 CPU online"
else
  fail vcpu.remove "the guest has $(live_value vm1 cpus) CPUs online"
fi
run rvirt vcpuinfo vm1
n=$(echo "$out" | grep -c '^VCPU:')
if [ "$n" = 1 ]; then pass vcpu.threads "vcpuinfo lists 1 vCPU"; else fail vcpu.threads "vcpuinfo lists $n: $out"; fi

# ---- disk hotplug ----------------------------------------------------------------------------

make_disk /tmp/hot.raw 16 HOTDISK
rvirt-img convert -f raw -O qcow2 /tmp/hot.raw /tmp/hot.qcow2 || fail disk.image "rvirt-img convert failed"
t0=$(now_ms)
check disk.attach rvirt attach-disk vm1 /tmp/hot.qcow2 vdb --subdriver qcow2 --live
if wait_live vm1 'blk vdb' '[ "$v" = HOTDISK ]' 60; then
  echo "RVIRT-TIME attach-disk-to-guest $(($(now_ms) - t0))"
  pass disk.guest "/dev/vdb appeared with its token after $(($(now_ms) - t0)) ms"
else
  fail disk.guest "the guest saw: $(tr -d '\r' </tmp/vm1.con | grep 'RVIRT-LIVE blk' | tr '\n' ' ')"
fi
run rvirt dumpxml vm1
if echo "$out" | grep -q "<address type='pci' domain='0x0000' bus='0x00' slot="; then pass disk.xml "live XML has the PCI address"; else fail disk.xml "no PCI address in the live XML"; fi
refused disk.locked "in use" rvirt-img resize /tmp/hot.qcow2 +1M
check disk.detach rvirt detach-disk vm1 vdb --live
if wait_live vm1 'blk vdb' '[ "$v" = gone ]' 30; then
  pass disk.gone "/dev/vdb disappeared"
else
  fail disk.gone "the guest still has /dev/vdb"
fi
check disk.unlocked rvirt-img resize /tmp/hot.qcow2 +1M

# ---- NIC hotplug -----------------------------------------------------------------------------

t0=$(now_ms)
check nic.attach rvirt attach-interface vm1 network default --model virtio --mac 52:54:00:aa:00:01 --live
if wait_live vm1 'net eth0' '[ "$v" != no-lease ]' 90; then
  echo "RVIRT-TIME attach-interface-to-lease $(($(now_ms) - t0))"
  pass nic.lease "eth0 got $(live_value vm1 'net eth0') from dnsmasq"
else
  fail nic.lease "eth0: '$(live_value vm1 'net eth0')'"
fi
run rvirt net-dhcp-leases default
if echo "$out" | grep -q '52:54:00:aa:00:01'; then pass nic.leases "the lease is listed"; else fail nic.leases "$out"; fi
check nic.detach rvirt detach-interface vm1 network --mac 52:54:00:aa:00:01 --live
if wait_live vm1 'net eth0' '[ "$v" = gone ]' 30; then pass nic.gone "eth0 disappeared"; else fail nic.gone "eth0 still there"; fi
check vm1.destroy rvirt destroy vm1
console_off vm1

# ---- free page reporting ---------------------------------------------------------------------

domain vm2 "freePageReporting='on'"
check define.vm2 rvirt define /tmp/vm2.xml
boot vm2
pid=$(field vm2 pid)
say vm2 "RVIRT-CMD alloc 200"
wait_console vm2 '^RVIRT-LIVE alloc 200' 60 || fail reporting.touch "the guest did not fill 200 MiB"
rss0=$(rss_kb "$pid")
say vm2 "RVIRT-CMD free"
wait_console vm2 '^RVIRT-LIVE free' 30 || fail reporting.touch "the guest did not free it"
n=0
while [ $n -lt 60 ] && [ $((rss0 - $(rss_kb "$pid"))) -lt $((150 * 1024)) ]; do sleep 1; n=$((n + 1)); done
rss1=$(rss_kb "$pid")
if [ $((rss0 - rss1)) -ge $((150 * 1024)) ]; then
  pass reporting.rss "VMM RSS $rss0 -> $rss1 kB within $n s of the guest freeing 200 MiB"
else
  fail reporting.rss "VMM RSS $rss0 -> $rss1 kB in 60 s, want 150 MiB less"
fi
check vm2.destroy rvirt destroy vm2
console_off vm2
dump_logs
