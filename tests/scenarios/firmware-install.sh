# An OS install from a CD through firmware, the virt-install --cdrom workflow in miniature:
# rvirt-vmm boots Debian's firmware (SeaBIOS, or OVMF with a private variable store), which
# boots guest/install-iso's CD (grub-mkrescue: GRUB, then Linux) from a virtio-scsi CD-ROM drive
# ahead of a blank virtio disk (fw_cfg bootorder). The installer reads the disc through Linux's
# sr driver and copies it onto the disk. Then the disk boots on its own with the drive empty.
# Files: /fw/install.iso, /fw/token, and /fw/bios-256k.bin or /fw/OVMF_CODE_4M.fd +
# /fw/OVMF_VARS_4M.fd. Arguments: rvirt.fw=bios|efi.
. /lib/rvirt/scenario.sh
fw=$(arg fw) || fw=bios
case "$fw" in
  bios) FW="--firmware /fw/bios-256k.bin" mem=256M ;;
  efi)
    # The per-VM copy of the template, as libvirt makes it. GRUB 2.06's EFI build sizes its
    # heap from the RAM it finds and cannot load the kernel with 256 MiB (QEMU q35 with the
    # same OVMF and CD fails the same way: "error: out of memory"); 1 GiB is virt-install's
    # usual size anyway.
    cp /fw/OVMF_VARS_4M.fd /tmp/vars.fd
    FW="--firmware /fw/OVMF_CODE_4M.fd --nvram /tmp/vars.fd" mem=1024M
    ;;
  *) fail args "rvirt.fw=$fw is neither bios nor efi"; exit 1 ;;
esac
limit=$(arg limit) || limit=400
dd if=/dev/zero of=/tmp/disk.img bs=1048576 count=0 seek=64 2>/dev/null

# shellcheck disable=SC2086
run_guest install "$limit" rvirt-vmm $FW --memory "$mem" \
  --disk path=/tmp/disk.img,format=raw,bootindex=2 \
  --disk path=/fw/install.iso,bus=scsi,device=cdrom,bootindex=1 --serial stdio
if grep -q 'rvirt-install: GRUB' /tmp/install.log; then
  pass install.grub "$(grep -o 'rvirt-install: GRUB [a-z0-9-]* started' /tmp/install.log | head -n1)"
else
  fail install.grub "GRUB never printed its banner"
fi

# What the installer wrote is the disc, byte for byte.
size=$(wc -c </fw/install.iso)
if [ "$(head -c "$size" /tmp/disk.img | md5sum | cut -d' ' -f1)" = "$(md5sum </fw/install.iso | cut -d' ' -f1)" ]; then
  pass disk.installed "$size bytes"
else
  fail disk.installed "the disk does not hold the disc's $size bytes"
fi

# The installed system: the disk boots (first in the order), the CD-ROM drive is empty.
# shellcheck disable=SC2086
run_guest installed "$limit" rvirt-vmm $FW --memory "$mem" \
  --disk path=/tmp/disk.img,format=raw,bootindex=1 --disk bus=scsi,device=cdrom --serial stdio
if [ "$fw" = efi ]; then
  # OVMF keeps its variables (boot options it made for the devices) in the store.
  if cmp -s /fw/OVMF_VARS_4M.fd /tmp/vars.fd; then
    fail efi.nvram "the variable store is unchanged"
  else
    pass efi.nvram "the firmware wrote its variable store"
  fi
fi
