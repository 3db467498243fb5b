# scripts/demo's scenario: boots the demo guest in rvirt-vmm with its console on the test host's
# console (so on the user's terminal), with a disk, a network to the test host and an RNG.
. /lib/rvirt/scenario.sh
make_tap rvtap0 192.168.100.1/24 || fail tap "cannot create rvtap0"
make_disk /tmp/disk.img 64 demo-disk
cmdline="console=ttyS0 panic=-1 rvirt.check=cpus,mem,blk,net,rng rvirt.cpus=2 rvirt.mem=512"
cmdline="$cmdline rvirt.blk=vda:demo-disk rvirt.net=192.168.100.2/24,192.168.100.1"
echo "test host: rvirt-vmm --kernel vmlinux --initrd initramfs.cpio --memory 512M --cpus 2 --disk path=/tmp/disk.img --net tap=rvtap0 --serial stdio"
t0=$(now_ms)
rvirt-vmm --kernel "$GUEST_VMLINUX" --initrd "$GUEST_INITRD" --cmdline "$cmdline" \
  --memory 512M --cpus 2 --disk path=/tmp/disk.img --net tap=rvtap0 --serial stdio </dev/null
rc=$?
echo "test host: rvirt-vmm exited with status $rc after $(($(now_ms) - t0)) ms"
if [ "$rc" = 0 ]; then pass demo.exit; else fail demo.exit "status $rc"; fi
check_disk demo.disk /tmp/disk.img demo-disk
