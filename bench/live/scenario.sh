# bench/live's scenario, run inside the test host VM: live resource changes on the same Debian
# guest (tests/scenarios/live-guest.sh reports what it sees on its console) under rvirt
# (rvirtd + rvirt + rvirt-vmm, the commands a user types) and under QEMU (-M pc, its human
# monitor on a pipe, the commands libvirt sends it), one after the other, REPS times each:
#   balloon  the guest touches 300 MiB and frees it, then the balloon takes 256 MiB: ms until
#            `info balloon` shows the target (each page the guest hands over is discarded by the
#            VMM before it is acknowledged), MiB/s, how far the VMM's RSS dropped meanwhile and
#            the VMM's CPU time for it (which includes the guest's vCPU time: KVM runs the guest
#            on the VMM's vCPU threads);
#            then the balloon gives it back (deflate: ms until the guest's MemTotal is back)
#   vcpu     1 -> 2 vCPUs (rvirt setvcpus 2 --live | QEMU device_add host-x86_64-cpu): ms until
#            the guest has 2 CPUs online; 2 -> 1: ms until the guest has 1
#   disk     a qcow2 image hot-added (rvirt attach-disk | QEMU drive_add + device_add
#            virtio-blk-pci): ms until the guest read the token from /dev/vdb; detach: ms until
#            /dev/vdb is gone
# rvirt's figures include its CLI and daemon (cli: an `rvirt vcpucount` round trip); QEMU's are
# from its monitor. The guest polls its resources every 0.2 s, so each figure is within ~0.2 s; both VMMs run the
# same guest, kernel and polling.
# Output: RVIRT-BENCH <vmm> <case> <rep> <key=value>...
. /lib/rvirt/scenario.sh
reps=$(arg reps) || reps=3
mem=640
export RVIRT_SOCKET=/run/rvirt/rvirtd.sock
STATE=/var/lib/rvirt
RUN=/run/rvirt
. /scenarios/daemon-lib.sh
. /scenarios/live-lib.sh

LIVE_INITRD=$(initrd_with_test /scenarios/live-guest.sh /tmp/live-initrd.cpio) ||
  { fail initrd "cannot build the live test initramfs"; exit 1; }
make_disk /tmp/hot.raw 16 HOTDISK
rvirt-img convert -f raw -O qcow2 /tmp/hot.raw /tmp/hot.qcow2 || { fail image "rvirt-img convert"; exit 1; }

# ---- the two VMMs behind one interface -------------------------------------------------------
# NAME is the console name (/tmp/NAME.con); PID the VMM's process.

# rvirt: a domain through rvirtd; commands are the rvirt CLI's.
rvirt_boot() {
  start_daemon || { fail rvirt.daemon "rvirtd did not answer"; return 1; }
  live_domain_xml rv "$mem" ""
  rvirt define /tmp/rv.xml >/dev/null && rvirt start rv >/dev/null || { fail rvirt.start "$(dump_logs)"; return 1; }
  console_on rv
  NAME=rv PID=$(field rv pid)
}
rvirt_say() { echo "$1" >/tmp/console.in; }
rvirt_balloon() { rvirt setmem rv "$1M" --live >/dev/null; }
rvirt_actual() { rvirt qemu-monitor-command rv --hmp --cmd 'info balloon' 2>/dev/null | sed -n 's/^balloon: actual=//p'; }
rvirt_vcpus() { rvirt setvcpus rv "$1" --live >/dev/null; }
rvirt_attach() { rvirt attach-disk rv /tmp/hot.qcow2 vdb --subdriver qcow2 --live >/dev/null; }
rvirt_detach() { rvirt detach-disk rv vdb --live >/dev/null; }
rvirt_stop() { rvirt destroy rv >/dev/null; console_off rv; kill "$DAEMON"; wait "$DAEMON" 2>/dev/null; }

# QEMU: -M pc (root-bus ACPI PCI hotplug, as libvirt's pc guests), serial and human monitor on
# pipes (PATH.in is what QEMU reads, PATH.out what it writes).
qemu_boot() {
  make_disk /tmp/qm-boot.raw 8 BOOTDISK
  for f in /tmp/qser /tmp/qmon; do rm -f "$f.in" "$f.out"; mkfifo "$f.in" "$f.out"; done
  qemu-system-x86_64 -M pc -enable-kvm -cpu host -smp 1,sockets=2,cores=1,threads=1,maxcpus=2 \
    -m "$mem" -nodefaults -no-user-config -display none \
    -kernel "$GUEST_VMLINUX" -initrd "$LIVE_INITRD" -append "$LIVE_CMDLINE rvirt.hostname=qm" \
    -drive file=/tmp/qm-boot.raw,format=raw,if=virtio,cache=writethrough \
    -device virtio-balloon-pci,id=balloon0 \
    -serial pipe:/tmp/qser -monitor pipe:/tmp/qmon 2>/tmp/qemu.err &
  PID=$!
  NAME=qm
  cat /tmp/qser.out >/tmp/qm.con &
  QCAT1=$!
  cat /tmp/qmon.out >/tmp/qmon.log &
  QCAT2=$!
}
qemu_say() { echo "$1" >/tmp/qser.in; }
qemu_hmp() { echo "$*" >/tmp/qmon.in; }
qemu_balloon() { qemu_hmp "balloon $1"; }
qemu_actual() {
  qemu_hmp "info balloon"
  sleep 0.02
  tr -d '\r' </tmp/qmon.log | sed -n 's/.*balloon: actual=\([0-9]*\).*/\1/p' | tail -n 1
}
qemu_vcpus() {
  if [ "$1" = 2 ]; then qemu_hmp "device_add host-x86_64-cpu,id=cpu1,socket-id=1,core-id=0,thread-id=0"; else qemu_hmp "device_del cpu1"; fi
}
qemu_attach() {
  qemu_hmp "drive_add 0 if=none,id=hot1,file=/tmp/hot.qcow2,format=qcow2,cache=writethrough"
  qemu_hmp "device_add virtio-blk-pci,drive=hot1,id=vdhot"
}
qemu_detach() { qemu_hmp "device_del vdhot"; }
qemu_stop() { qemu_hmp quit; sleep 1; kill "$PID" "$QCAT1" "$QCAT2" 2>/dev/null; wait "$PID" 2>/dev/null; }

# ---- the measurements ------------------------------------------------------------------------

# cpu_ms PID — user + system CPU time of PID (all its threads), ms (clock ticks of 10 ms).
cpu_ms() { awk '{ print ($14 + $15) * 10 }' "/proc/$1/stat"; }

# wait_count NAME PATTERN N SECS — true once /tmp/NAME.con has N lines matching PATTERN.
wait_count() {
  n=0
  while [ "$(tr -d '\r' <"/tmp/$1.con" | grep -c "$2")" -lt "$3" ]; do
    [ $n -ge $(($4 * 10)) ] && return 1
    sleep 0.1
    n=$((n + 1))
  done
}

# wait_actual VMM MIB SECS — true once VMM's balloon reports MIB ("info balloon", the guest's
# own count of pages it handed over).
wait_actual() {
  n=0
  while [ "$("${1}_actual")" != "$2" ]; do
    [ $n -ge $(($3 * 20)) ] && return 1
    sleep 0.05
    n=$((n + 1))
  done
}

# bench VMM — boots the guest under VMM and runs every case REPS times.
bench() {
  vmm=$1 p=$2
  "${p}_boot" || return
  if ! wait_console "$NAME" '^RVIRT-PASS live' 180; then
    fail "$vmm.boot" "no RVIRT-PASS live within 180 s"
    tr -d '\r' <"/tmp/$NAME.con" | tail -n 20
    "${p}_stop"
    return
  fi
  wait_live "$NAME" mem true 10
  mem0=$(live_value "$NAME" mem)
  i=1
  while [ $i -le "$reps" ]; do
    # Balloon: the guest backs 300 MiB with host memory, frees it, then the balloon takes 256 MiB.
    "${p}_say" "RVIRT-CMD alloc 300"
    wait_count "$NAME" '^RVIRT-LIVE alloc 300' "$i" 120 ||
      { fail "$vmm.alloc" "the guest did not fill 300 MiB"; tr -d '\r' <"/tmp/$NAME.con" | tail -n 30; }
    "${p}_say" "RVIRT-CMD free"
    wait_count "$NAME" '^RVIRT-LIVE free' "$i" 60 || fail "$vmm.alloc" "the guest did not free it"
    rss0=$(rss_kb "$PID")
    c0=$(cpu_ms "$PID")
    t0=$(now_ms)
    "${p}_balloon" $((mem - 256))
    if wait_actual "$p" $((mem - 256)) 120; then
      ms=$(($(now_ms) - t0))
      rss1=$(rss_kb "$PID")
      echo "RVIRT-BENCH $vmm balloon $i inflate_ms=$ms mib_per_s=$((256 * 1000 / (ms > 0 ? ms : 1))) rss_drop_mib=$(((rss0 - rss1) / 1024)) vmm_cpu_ms=$(($(cpu_ms "$PID") - c0))"
    else
      fail "$vmm.balloon" "balloon actual $("${p}_actual") MiB after 120 s, want $((mem - 256))"
    fi
    wait_live "$NAME" mem "[ \$v -le $((mem0 - 250 * 1024)) ]" 30 || fail "$vmm.balloon" "MemTotal $(live_value "$NAME" mem)"
    t0=$(now_ms)
    "${p}_balloon" "$mem"
    if wait_live "$NAME" mem "[ \$v -ge $((mem0 - 1024)) ]" 60; then
      echo "RVIRT-BENCH $vmm deflate $i deflate_ms=$(($(now_ms) - t0))"
    else
      fail "$vmm.deflate" "MemTotal $(live_value "$NAME" mem) kB, want $mem0"
    fi
    # vCPUs.
    t0=$(now_ms)
    "${p}_vcpus" 2
    if wait_live "$NAME" cpus '[ "$v" = 2 ]' 60; then add=$(($(now_ms) - t0)); else add=; fail "$vmm.vcpu" "no second CPU"; fi
    sleep 1
    t0=$(now_ms)
    "${p}_vcpus" 1
    if wait_live "$NAME" cpus '[ "$v" = 1 ]' 60; then del=$(($(now_ms) - t0)); else del=; fail "$vmm.vcpu" "the second CPU stayed"; fi
    echo "RVIRT-BENCH $vmm vcpu $i add_ms=$add remove_ms=$del"
    # What a command costs before it reaches the VMM: an rvirt CLI round trip through rvirtd
    # that changes nothing (QEMU's monitor commands are written straight into its pipe).
    if [ "$p" = rvirt ]; then
      t0=$(now_ms)
      rvirt vcpucount rv >/dev/null
      echo "RVIRT-BENCH $vmm cli $i cli_ms=$(($(now_ms) - t0))"
    fi
    sleep 1
    # Disks.
    t0=$(now_ms)
    "${p}_attach"
    if wait_live "$NAME" 'blk vdb' '[ "$v" = HOTDISK ]' 60; then add=$(($(now_ms) - t0)); else add=; fail "$vmm.disk" "no /dev/vdb: $(live_value "$NAME" 'blk vdb')"; fi
    t0=$(now_ms)
    "${p}_detach"
    if wait_live "$NAME" 'blk vdb' '[ "$v" = gone ]' 60; then del=$(($(now_ms) - t0)); else del=; fail "$vmm.disk" "/dev/vdb stayed"; fi
    echo "RVIRT-BENCH $vmm disk $i attach_ms=$add detach_ms=$del"
    sleep 1
    i=$((i + 1))
  done
  "${p}_stop"
  pass "$vmm.done"
}

bench rvirt rvirt
bench qemu qemu
[ -s /tmp/qemu.err ] && sed 's/^/qemu.err| /' /tmp/qemu.err
