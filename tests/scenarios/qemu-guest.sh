# Boots the test guest with QEMU (KVM inside the test host): checks the guest fixtures and the test
# host independently of rvirt-vmm. Needs `--qemu`.
. /lib/rvirt/scenario.sh
make_tap tap0 192.168.100.1/24 || fail tap "cannot create tap0"
make_disk /tmp/disk.img 16 qemu-token-1
run_guest qemu 180 qemu-system-x86_64 -enable-kvm -cpu host -M pc -smp 2 -m 256 \
  -nodefaults -no-reboot -display none -vga none -monitor none -serial stdio \
  -kernel "$GUEST_VMLINUX" -initrd "$GUEST_INITRD" \
  -append "$GUEST_CMDLINE rvirt.check=cpus,mem,blk,net,rng rvirt.cpus=2 rvirt.mem=256 rvirt.blk=vda:qemu-token-1 rvirt.net=192.168.100.2/24,192.168.100.1" \
  -drive file=/tmp/disk.img,if=virtio,format=raw \
  -netdev tap,id=n0,ifname=tap0,script=no,downscript=no -device virtio-net-pci,netdev=n0,romfile= \
  -device virtio-rng-pci
check_disk qemu.disk /tmp/disk.img qemu-token-1
