# Guest-side part of live-e2e.sh, appended to the test guest's initramfs as /etc/rvirt/test.sh and
# sourced by its /init after the checks. It does what a distribution does for live resources and
# reports what the guest sees, so the host side can assert it:
#   - onlines hotplugged CPUs (udev's "cpu online" rule) and reports the online count;
#   - reports MemTotal whenever it changes (the balloon takes memory away and gives it back);
#   - reports block devices and network interfaces as they come and go (ACPI PCI hotplug, no
#     rescan), reads a token from a new disk, takes a DHCP lease on a new NIC;
#   - runs commands typed on the serial console ("RVIRT-CMD <cmd>"): `alloc MIB` fills a tmpfs
#     file of MIB MiB and `free` removes it (touched, then freed guest memory), `spin CPU` runs a
#     busy loop pinned to CPU and reports the CPU time that CPU gained.
# Lines: RVIRT-LIVE mem <kB> | cpus <n> | blk <dev> <token> | blk <dev> gone | net <ifc> <addr> |
#        net <ifc> gone | alloc <MiB> | free | spin <cpu> <ticks>
# Guest memory is not the initramfs: /init runs from rootfs, so a tmpfs is mounted for `alloc`.

mkdir -p /etc /mnt/fill && mount -t tmpfs -o size=90% tmpfs /mnt/fill

live() { echo "RVIRT-LIVE $*"; }

mem_total() { sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo; }
cpus_online() { grep -c '^processor' /proc/cpuinfo; }
cpu_ticks() { awk -v c="cpu$1" '$1 == c { print $2 + $3 + $4 }' /proc/stat; }

# online_new_cpus — what udev's rule SUBSYSTEM=="cpu", ACTION=="add" does on distributions.
online_new_cpus() {
  for f in /sys/devices/system/cpu/cpu[0-9]*/online; do
    [ -e "$f" ] && [ "$(cat "$f")" = 0 ] && echo 1 >"$f" 2>/dev/null
  done
}

dhcp_on() {
  ip link set "$1" up
  if udhcpc -i "$1" -n -q -t 15 -T 3 -s /tmp/udhcpc.script -x "hostname:$(hostname)" >/dev/null 2>&1; then
    live net "$1" "$(ip -4 -o addr show dev "$1" | sed -n 's/.* inet \([0-9.]*\).*/\1/p')"
  else
    live net "$1" no-lease
  fi
}

# Commands from the serial console (the host side types them through `rvirt console`). The
# reader needs the console as its stdin explicitly: a non-interactive shell gives a background
# list /dev/null instead. No echo, so typed commands do not interleave with RVIRT-LIVE lines.
stty -echo </dev/console 2>/dev/null
(
  while read -r tag cmd a1; do
    [ "$tag" = RVIRT-CMD ] || continue
    case "$cmd" in
      alloc) dd if=/dev/zero of=/mnt/fill/x bs=1048576 count="$a1" 2>/dev/null; sync; live alloc "$a1" ;;
      free) rm -f /mnt/fill/x; live free ;;
      spin)
        before=$(cpu_ticks "$a1")
        taskset -c "$a1" sh -c 'i=0; while [ $i -lt 20000 ]; do i=$((i + 1)); done'
        live spin "$a1" $(($(cpu_ticks "$a1") - before))
        ;;
    esac
  done
) </dev/console &

(
  write_udhcpc_script
  last_mem= last_cpus=
  known_blk=$(ls /sys/block 2>/dev/null | tr '\n' ' ')
  known_net=$(ls /sys/class/net | tr '\n' ' ')
  while :; do
    online_new_cpus
    m=$(mem_total)
    [ "$m" != "$last_mem" ] && { live mem "$m"; last_mem=$m; }
    c=$(cpus_online)
    [ "$c" != "$last_cpus" ] && { live cpus "$c"; last_cpus=$c; }
    now_blk=$(ls /sys/block 2>/dev/null | tr '\n' ' ')
    for b in $now_blk; do
      case " $known_blk " in *" $b "*) ;; *)
        wait_for "/dev/$b"
        live blk "$b" "$(dd if="/dev/$b" bs=16 count=1 2>/dev/null | tr -cd 'A-Za-z0-9-')"
        ;;
      esac
    done
    for b in $known_blk; do
      case " $now_blk " in *" $b "*) ;; *) live blk "$b" gone ;; esac
    done
    known_blk=$now_blk
    now_net=$(ls /sys/class/net | tr '\n' ' ')
    for n in $now_net; do
      case " $known_net " in *" $n "*) ;; *) dhcp_on "$n" & ;; esac
    done
    for n in $known_net; do
      case " $now_net " in *" $n "*) ;; *) live net "$n" gone ;; esac
    done
    known_net=$now_net
    sleep 0.2
  done
) &
pass live "reporting"
