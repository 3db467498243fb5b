# scripts/demo's scenario: the main job done the way a user does it, through the stack. rvirtd
# runs; rvirt-img makes a qcow2 disk; `rvirt install` defines and starts the demo guest (Debian's
# stock kernel, busybox initramfs; 512 MiB, 1 of 2 vCPUs, the disk, the NAT network, an RNG);
# `rvirt console` shows its serial console; the guest is resized while it runs (`setmem --live`
# through the balloon, `setvcpus --live` through ACPI CPU hotplug) and inspected (dommemstat,
# list, dominfo, domifaddr); `rvirt shutdown` presses its ACPI power button; `rvirt undefine`
# removes it; rvirt-img reads back what the guest wrote to its disk.
#
# Every command is printed as a user types it ("$ ..."), then its output; the guest's console
# lines are printed as "console| ..." as they arrive. Each step ends with RVIRT-PASS demo.<step>
# or RVIRT-FAIL demo.<step> <reason>; the last line is RVIRT-PASS demo.all (every step passed)
# or RVIRT-FAIL demo.all <failed steps>, and the script exits non-zero if a step failed.
#
# Runs inside the test host (busybox sh) by default. scripts/demo also runs it on a machine whose
# /dev/kvm runs guests natively, with these set (otherwise the test host's paths are used):
#   DEMO_LIB      directory with scenario.sh, daemon-lib.sh, live-lib.sh and live-guest.sh
#   DEMO_KERNEL   the guest kernel (vmlinux), DEMO_INITRD the guest initramfs
#   RVIRT_TMP     directory for every file of the run (disk, logs, console, rvirtd's state)
#   DEMO_NET      "none": no network (a NAT network would change that machine's networking)
#   DEMO_BOOT_SECS  how long the guest may take to finish its checks (default 240)
lib=${DEMO_LIB:-}
if [ -n "$lib" ]; then . "$lib/scenario.sh"; else . /lib/rvirt/scenario.sh; fi
[ -n "${DEMO_KERNEL:-}" ] && GUEST_VMLINUX=$DEMO_KERNEL
[ -n "${DEMO_INITRD:-}" ] && GUEST_INITRD=$DEMO_INITRD
W=${RVIRT_TMP:-/tmp}
export RVIRT_SOCKET=${RVIRT_SOCKET:-/run/rvirt/rvirtd.sock}
STATE=${STATE:-/var/lib/rvirt}
RUN=${RUN:-/run/rvirt}
. "${lib:-/scenarios}/daemon-lib.sh"
. "${lib:-/scenarios}/live-lib.sh"
net=${DEMO_NET:-default}

passed=
failed=
ok() {
  pass "demo.$1" ${2:+"$2"}
  passed="$passed $1"
}
bad() { fail "demo.$1" "$2"; failed="$failed $1"; }

# sh_run 'COMMAND LINE' — prints the command as typed at a prompt, runs it, prints its output;
# leaves the output in $out and returns its status.
sh_run() {
  echo "\$ $1"
  out=$(eval "$1" 2>&1)
  rc=$?
  [ -n "$out" ] && echo "$out"
  [ $rc = 0 ] || echo "(exit status $rc)"
  return $rc
}

# step NAME 'COMMAND LINE' — sh_run, then pass or fail NAME on its status.
step() {
  if sh_run "$2"; then ok "$1"; else bad "$1" "exit status $rc: $(echo "$out" | tr '\n' ' ' | cut -c1-200)"; fi
}

# The guest's console, as `rvirt console` writes it to $W/demo.con, shown line by line.
con=$W/demo.con
shown=0
cr=$(printf '\r')
show_console() {
  [ -f "$con" ] || return 0
  n=$(wc -l <"$con")
  [ "$n" -gt "$shown" ] || return 0
  sed -n "$((shown + 1)),${n}p" "$con" | while IFS= read -r l; do
    l=${l%"$cr"}
    [ -n "$l" ] && echo "console| $l"
  done
  shown=$n
}

# watch_console PATTERN SECS — shows the console until a line matches PATTERN (true) or SECS
# pass (false).
watch_console() {
  i=0
  while [ $i -lt $(($2 * 5)) ]; do
    show_console
    grep -q "$1" "$con" 2>/dev/null && { show_console; return 0; }
    sleep 0.2
    i=$((i + 1))
  done
  show_console
  return 1
}

# watch_live WHAT TEST SECS — shows the console until the last "RVIRT-LIVE WHAT v" satisfies
# TEST (a shell test on $v).
watch_live() {
  i=0
  while [ $i -lt $(($3 * 5)) ]; do
    show_console
    v=$(live_value demo "$1")
    [ -n "$v" ] && eval "$2" && { show_console; return 0; }
    sleep 0.2
    i=$((i + 1))
  done
  show_console
  return 1
}

# wait_shut_off SECS — true once `rvirt domstate demo` says "shut off".
wait_shut_off() {
  i=0
  while [ $i -lt $(($1 * 5)) ]; do
    [ "$(rvirt domstate demo 2>/dev/null | head -n 1)" = "shut off" ] && return 0
    sleep 0.2
    i=$((i + 1))
  done
  return 1
}

finish() {
  show_console
  console_off demo
  if rvirt dominfo demo >/dev/null 2>&1; then
    rvirt destroy demo >/dev/null 2>&1
    rvirt undefine demo >/dev/null 2>&1
  fi
  [ -n "${DAEMON:-}" ] && kill "$DAEMON" 2>/dev/null
  echo
  echo "demo: steps passed:${passed:- none}"
  if [ -n "$failed" ]; then
    echo "demo: steps failed:$failed"
    echo "demo: rvirtd's log, the VMM's log and the console follow"
    dump_logs
    fail demo.all "failed:$failed"
    exit 1
  fi
  pass demo.all "$(echo $passed | wc -w) steps"
  exit 0
}

# ---- 1. the daemon ---------------------------------------------------------------------------

echo "== 1. start rvirtd, the management daemon"
echo "\$ rvirtd --socket $RVIRT_SOCKET --state-dir $STATE --run-dir $RUN &"
if start_daemon; then ok daemon "rvirtd answers on $RVIRT_SOCKET"; else bad daemon "rvirtd did not answer"; finish; fi
if [ "$net" = default ]; then
  step net.start "rvirt net-start default"
  sh_run "rvirt net-list"
fi

# ---- 2. the disk -----------------------------------------------------------------------------

echo
echo "== 2. a qcow2 disk with a token the guest checks (it writes its answer at byte 4096)"
disk=$W/demo.qcow2
rm -f "$disk" "$W/demo.raw" "$W/demo-out.raw"
sh_run "rvirt-img create -f raw $W/demo.raw 64M" &&
  sh_run "printf demo-disk | dd of=$W/demo.raw conv=notrunc" &&
  sh_run "rvirt-img convert -f raw -O qcow2 $W/demo.raw $disk" &&
  sh_run "rvirt-img info $disk"
if [ $rc = 0 ]; then ok disk.create "$disk"; else bad disk.create "exit status $rc"; fi
rm -f "$W/demo.raw"

# ---- 3. install ------------------------------------------------------------------------------

echo
echo "== 3. install the guest: 512 MiB, 1 vCPU of at most 2, the disk, the network, direct kernel boot"
initrd=$(initrd_with_test "${lib:-/scenarios}/live-guest.sh" "$W/demo-initrd.cpio") ||
  bad initrd "cannot add live-guest.sh to the guest initramfs"
checks=cpus,mem,blk,rng
netargs=
netopt="--network none"
if [ "$net" = default ]; then
  checks=cpus,mem,blk,net,rng
  netargs=" rvirt.net=dhcp"
  netopt="--network network=default"
fi
kargs="console=ttyS0 quiet panic=-1 rvirt.check=$checks rvirt.cpus=1 rvirt.mem=512"
kargs="$kargs rvirt.blk=vda:demo-disk$netargs rvirt.hostname=demo rvirt.sleep=3600"
step install "rvirt install --name demo --memory 512 --vcpus 1,maxvcpus=2 --import \\
    --disk path=$disk,format=qcow2 \\
    --boot 'kernel=$GUEST_VMLINUX,initrd=$initrd,kernel_args=\"$kargs\"' \\
    $netopt --noautoconsole"
echo "$failed" | grep -q install && finish

# ---- 4. the console --------------------------------------------------------------------------

echo
echo "== 4. the guest's serial console (in the background, shown here as console| lines)"
echo "\$ rvirt console demo >$con &"
: >"$con"
console_on demo
boot_secs=${DEMO_BOOT_SECS:-240}
if watch_console '^RVIRT-DONE' "$boot_secs"; then
  guest_fails=$(tr -d '\r' <"$con" | grep '^RVIRT-FAIL' | tr '\n' ' ')
  if [ -z "$guest_fails" ]; then
    ok boot "the guest booted and its checks passed ($(tr -d '\r' <"$con" | sed -n 's/^RVIRT-PASS \([a-z]*\) .*/\1/p' | tr '\n' ' ' | sed 's/ $//'))"
  else
    bad boot "the guest's checks failed: $guest_fails"
  fi
else
  bad boot "no RVIRT-DONE on the console within $boot_secs s"
  finish
fi
watch_live mem true 20
watch_live cpus true 5
mem0=$(live_value demo mem)

# ---- 5. live changes -------------------------------------------------------------------------

echo
echo "== 5. change the running guest: memory through the balloon, a vCPU through ACPI hotplug"
step setmem "rvirt setmem demo 256M --live"
# The balloon takes 256 MiB: MemTotal ends 256 MiB lower (within 1 MiB).
if watch_live mem "[ \$v -le $((mem0 - 255 * 1024)) ]" 120; then
  ok setmem.guest "the guest's MemTotal went from $mem0 kB to $(live_value demo mem) kB"
else
  bad setmem.guest "the guest's MemTotal is $(live_value demo mem) kB (was $mem0 kB), want 256 MiB less"
fi
if sh_run "rvirt dommemstat demo" && echo "$out" | grep -q '^actual 262144$'; then
  ok dommemstat "actual 262144"
else
  bad dommemstat "want 'actual 262144': $(echo "$out" | tr '\n' ' ')"
fi
step setvcpus "rvirt setvcpus demo 2 --live"
if watch_live cpus '[ "$v" = 2 ]' 90; then
  ok setvcpus.guest "the guest has 2 CPUs online"
else
  bad setvcpus.guest "the guest has $(live_value demo cpus) CPUs online, want 2"
fi
step vcpucount "rvirt vcpucount demo"
step list "rvirt list"
step dominfo "rvirt dominfo demo"
if [ "$net" = default ]; then step domifaddr "rvirt domifaddr demo"; fi
show_console

# ---- 6. shutdown and undefine ----------------------------------------------------------------

echo
echo "== 6. shut the guest down (ACPI power button), then remove it"
step shutdown "rvirt shutdown demo"
if watch_console '^RVIRT-POWERBUTTON' 60 && wait_shut_off 60; then
  ok shutdown.off "the guest powered off"
else
  bad shutdown.off "the domain is '$(rvirt domstate demo 2>&1 | head -n 1)', want 'shut off'"
fi
sh_run "rvirt domstate demo --reason"
sh_run "rvirt list --all"
step undefine "rvirt undefine demo"
sh_run "rvirt list --all"
console_off demo

echo
echo "== the guest's answer on its disk, read back through the qcow2 image"
step disk.convert "rvirt-img convert -f qcow2 -O raw $disk $W/demo-out.raw"
want=RVIRT-BLK-OUT:demo-disk
sh_run "dd if=$W/demo-out.raw bs=1 skip=4096 count=${#want} 2>/dev/null; echo"
if [ "$out" = "$want" ]; then
  ok disk.guest "the guest wrote '$want' at byte 4096"
else
  bad disk.guest "byte 4096 holds '$out', want '$want'"
fi
rm -f "$W/demo-out.raw"
finish
