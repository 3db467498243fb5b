# bench/vmm's scenario, run inside the test host VM: the same guests booted by each VMM on the
# test host's KVM, one after the other, REPS times (rvirt.reps=N).
#   first-insn  a tiny PVH ELF whose entry instruction is ud2: with no IDT the CPU triple-faults
#               at once and the VMM exits, so exec->exit bounds exec->first guest instruction
#   boot        Debian's kernel + the test initramfs (1 vCPU, 128 MiB, quiet console): exec->
#               RVIRT-BOOTED (guest /init runs) and RVIRT-DONE; RSS sampled at RVIRT-DONE while the
#               guest idles (rvirt.sleep=1); for rvirt-vmm also its boot-timer line (guest /init
#               writes port 0x440 first thing; rvirt.bootport=1088 for every VMM, a no-op on QEMU)
# Output: RVIRT-BENCH <vmm> <case> <rep> <key=value>... (from rvirt-bench-exec).
. /lib/rvirt/scenario.sh
reps=$(arg reps) || reps=3
tiny=/bench/tiny-pvh.elf

vmms="qemu-microvm qemu-pc"
if command -v rvirt-vmm >/dev/null; then
  vmms="rvirt-vmm $vmms"
else
  echo "RVIRT-BENCH rvirt-vmm unavailable"
fi

# launch VMM KERNEL INITRD CMDLINE [rvirt-bench-exec options] — one run of VMM.
launch() {
  vmm=$1 kernel=$2 initrd=$3 cmdline=$4
  shift 4
  case "$vmm" in
    rvirt-vmm)
      rvirt-bench-exec "$@" -- rvirt-vmm --kernel "$kernel" ${initrd:+--initrd "$initrd"} \
        --cmdline "$cmdline" --memory 128M --cpus 1 --serial stdio ;;
    qemu-microvm | qemu-pc)
      rvirt-bench-exec "$@" -- qemu-system-x86_64 -M "${vmm#qemu-}" -enable-kvm -cpu host -smp 1 \
        -m 128 -nodefaults -no-user-config -no-reboot -display none -serial stdio \
        -kernel "$kernel" ${initrd:+-initrd "$initrd"} -append "$cmdline" ;;
  esac
}

i=1
while [ "$i" -le "$reps" ]; do
  for v in $vmms; do
    r=$(launch "$v" "$tiny" "" "" --timeout 60 2>/dev/null)
    echo "RVIRT-BENCH $v first-insn $i $r"
    r=$(launch "$v" "$GUEST_VMLINUX" "$GUEST_INITRD" "$GUEST_CMDLINE rvirt.sleep=1 rvirt.bootport=1088" \
      --marker RVIRT-BOOTED --marker RVIRT-DONE --rss-at RVIRT-DONE --guest-mib 128 --timeout 120 2>/tmp/bench.err)
    # rvirt-vmm's own boot timer (the guest's /init writes port 0x440 first thing).
    bt=$(sed -n 's/.*boot-timer: \([0-9.]*\) ms since exec.*/\1/p' /tmp/bench.err | head -n 1)
    echo "RVIRT-BENCH $v boot $i $r${bt:+ boot_timer_ms=$bt}"
  done
  i=$((i + 1))
done
