# Helpers for scenarios that watch a guest running tests/scenarios/live-guest.sh (its RVIRT-LIVE
# lines on a console captured in $RVIRT_TMP/NAME.con, where daemon-lib.sh's console_on writes
# it; RVIRT_TMP defaults to /tmp), sourced after /lib/rvirt/scenario.sh. Used by live-e2e.sh,
# demo.sh and bench/live (rvirt and QEMU guests alike).

# live_value NAME WHAT — the last value of "RVIRT-LIVE WHAT <value>" on NAME's console, from
# whole lines only (the last line may still be arriving: "mem 4" of "mem 415016").
live_value() {
  _con=${RVIRT_TMP:-/tmp}/$1.con
  head -n "$(wc -l <"$_con")" "$_con" | tr -d '\r' | sed -n "s/^RVIRT-LIVE $2 //p" | tail -n 1
}

# wait_live NAME WHAT TEST SECS — waits until the last "RVIRT-LIVE WHAT v" satisfies TEST
# (a shell test on $v, e.g. '[ "$v" -lt 1000 ]').
wait_live() {
  n=0
  while [ $n -lt $(($4 * 10)) ]; do
    v=$(live_value "$1" "$2")
    [ -n "$v" ] && eval "$3" && return 0
    sleep 0.1
    n=$((n + 1))
  done
  return 1
}

# rss_kb PID — resident set of PID in kB (/proc/PID/status has a tab after "VmRSS:").
rss_kb() { awk '$1 == "VmRSS:" { print $2 }' "/proc/$1/status"; }

# live_domain_xml NAME MIB EXTRA-BALLOON-ATTRS — /tmp/NAME.xml for rvirtd: MIB MiB, one vCPU of
# two, the live test initramfs ($LIVE_INITRD), a boot disk (vda, so that a hot-added disk is the
# guest's vdb as in libvirt's examples), a virtio balloon with statistics every 2 s.
live_domain_xml() {
  make_disk "/tmp/$1-boot.raw" 8 BOOTDISK
  cat >"/tmp/$1.xml" <<XML
<domain type='kvm'>
  <name>$1</name>
  <memory unit='MiB'>$2</memory>
  <currentMemory unit='MiB'>$2</currentMemory>
  <vcpu placement='static' current='1'>2</vcpu>
  <os>
    <type arch='x86_64'>hvm</type>
    <kernel>$GUEST_VMLINUX</kernel>
    <initrd>$LIVE_INITRD</initrd>
    <cmdline>$LIVE_CMDLINE rvirt.hostname=$1</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='writethrough'/>
      <source file='/tmp/$1-boot.raw'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <memballoon model='virtio' $3><stats period='2'/></memballoon>
    <serial type='pty'><target port='0'/></serial>
  </devices>
</domain>
XML
}

# The guest's command line: the boot disk is checked (so it is there before the live script
# starts watching), then the guest stays up.
LIVE_CMDLINE="$GUEST_CMDLINE rvirt.check=blk rvirt.blk=vda:BOOTDISK rvirt.sleep=900"
