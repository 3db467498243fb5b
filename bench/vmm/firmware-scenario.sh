# bench/vmm/firmware's scenario, inside the test host: each VMM boots SeaBIOS → the installer
# CD (virtio-scsi CD-ROM, bootindex 1; blank virtio-blk disk, bootindex 2) → GRUB → Linux, whose
# installer copies the disc to the disk (cd case), then boots the installed disk (disk case).
# Output: RVIRT-BENCH <vmm> <case> <rep> <key=value>... (rvirt-bench-exec's, plus cd_mib_s).
# QEMU runs with graphics=off so that its SeaBIOS, too, writes its banner to COM1 (sercon).
. /lib/rvirt/scenario.sh
reps=$(arg reps) || reps=3
fw=$(arg fw) || fw=bios
size=$(wc -c </fw/install.iso)
# Firmware per VMM: SeaBIOS (256 MiB guests), or OVMF with a fresh copy of the variable store
# per run (1 GiB: GRUB 2.06's EFI heap cannot load the kernel with 256 MiB, under either VMM).
if [ "$fw" = efi ]; then
  mem=1024
  RVIRT_FW="--firmware /fw/OVMF_CODE_4M.fd --nvram /tmp/vars.fd"
  QEMU_FW="-drive if=pflash,format=raw,unit=0,readonly=on,file=/fw/OVMF_CODE_4M.fd -drive if=pflash,format=raw,unit=1,file=/tmp/vars.fd"
else
  mem=256
  RVIRT_FW="--firmware /fw/bios-256k.bin"
  QEMU_FW="-bios /fw/bios-256k.bin"
fi

# launch VMM CASE [rvirt-bench-exec options] — one run; CASE cd boots the CD, disk the disk.
launch() {
  vmm=$1 kase=$2
  shift 2
  if [ "$kase" = cd ]; then cdo=1 hdo=2 cd=/fw/install.iso; else cdo=2 hdo=1 cd=; fi
  [ "$fw" = efi ] && cp /fw/OVMF_VARS_4M.fd /tmp/vars.fd
  # shellcheck disable=SC2086
  case "$vmm" in
    rvirt-vmm)
      rvirt-bench-exec "$@" -- rvirt-vmm $RVIRT_FW --memory "${mem}M" --cpus 1 \
        --disk "path=/tmp/disk.img,format=raw,bootindex=$hdo" \
        --disk "bus=scsi,device=cdrom${cd:+,path=$cd},bootindex=$cdo" --serial stdio ;;
    qemu-q35)
      rvirt-bench-exec "$@" -- qemu-system-x86_64 -M q35,graphics=off -enable-kvm -cpu host -smp 1 -m "$mem" \
        -nodefaults -no-user-config -no-reboot -display none -serial stdio $QEMU_FW \
        -device virtio-scsi-pci,id=scsi0 \
        -drive "if=none,id=cd,media=cdrom,readonly=on${cd:+,format=raw,file=$cd}" \
        -device "scsi-cd,drive=cd,bus=scsi0.0,bootindex=$cdo" \
        -drive if=none,id=hd,file=/tmp/disk.img,format=raw,cache=writeback \
        -device "virtio-blk-pci,drive=hd,bootindex=$hdo" ;;
  esac
}

# The firmware's first line on COM1: SeaBIOS's banner, OVMF's boot manager.
if [ "$fw" = efi ]; then first=BdsDxe; else first=SeaBIOS; fi
i=1
while [ "$i" -le "$reps" ]; do
  for v in rvirt-vmm qemu-q35; do
    dd if=/dev/zero of=/tmp/disk.img bs=1048576 count=0 seek=64 2>/dev/null
    r=$(launch "$v" cd --marker "$first" --marker rvirt-install: --marker RVIRT-BOOTED \
      --marker RVIRT-DONE --rss-at RVIRT-DONE --guest-mib "$mem" --timeout 600 2>/tmp/bench.err)
    # The installer's "install.copy N sectors to vda in S s" line.
    secs=$(sed -n 's/.*install.copy .* in \([0-9.]*\) s.*/\1/p' /tmp/bench.err | head -n 1)
    mibs=$(awk -v s="$secs" -v b="$size" 'BEGIN { if (s > 0) printf "%.1f", b / 1048576 / s }')
    echo "RVIRT-BENCH $v cd $i $r${mibs:+ cd_mib_s=$mibs}"
    grep -q 'RVIRT-PASS installed\|RVIRT-PASS install.copy' /tmp/bench.err ||
      echo "RVIRT-FAIL bench.$v.cd the installer did not copy the disc: $(tail -n 3 /tmp/bench.err | tr '\n' ' ')"
    r=$(launch "$v" disk --marker RVIRT-BOOTED --marker RVIRT-DONE --timeout 600 2>/tmp/bench.err)
    echo "RVIRT-BENCH $v disk $i $r"
    grep -q 'RVIRT-PASS installed.boot' /tmp/bench.err ||
      echo "RVIRT-FAIL bench.$v.disk the disk did not boot the installed system: $(tail -n 3 /tmp/bench.err | tr '\n' ' ')"
  done
  i=$((i + 1))
done
