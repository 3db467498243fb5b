# Boots the test guest in rvirt-vmm with every device and checks it from inside (cpus, mem, blk,
# net, rng) and from the test host (the bytes the guest wrote, the VMM's exit status, the
# VMM's boot-timer line: the guest's /init writes rvirt-vmm's boot-timer port 0x440 first thing).
# Arguments: rvirt.kernel=vmlinux|bzImage, rvirt.cpus=N, rvirt.mem=MIB.
. /lib/rvirt/scenario.sh
kernel=$(arg kernel) || kernel=vmlinux
cpus=$(arg cpus) || cpus=1
mem=$(arg mem) || mem=256
case "$kernel" in
  vmlinux) image=$GUEST_VMLINUX ;;
  bzImage) image=$GUEST_BZIMAGE ;;
  *) fail args "rvirt.kernel=$kernel is neither vmlinux nor bzImage"; exit 1 ;;
esac
token="vmm-$kernel-$cpus"
make_tap rvtap0 192.168.100.1/24 || fail tap "cannot create rvtap0"
make_disk /tmp/disk.img 16 "$token"
run_guest vmm 150 rvirt-vmm --kernel "$image" --initrd "$GUEST_INITRD" \
  --cmdline "$GUEST_CMDLINE rvirt.check=cpus,mem,blk,net,rng rvirt.cpus=$cpus rvirt.mem=$mem rvirt.blk=vda:$token rvirt.net=192.168.100.2/24,192.168.100.1 rvirt.bootport=1088" \
  --memory "${mem}M" --cpus "$cpus" --disk path=/tmp/disk.img --net tap=rvtap0 --serial stdio
check_disk vmm.disk /tmp/disk.img "$token"
# run_guest keeps the VMM's stdout and stderr in /tmp/vmm.log.
bt=$(grep -o 'boot-timer: [0-9.]* ms since exec' /tmp/vmm.log | head -n 1)
if [ -n "$bt" ]; then
  pass vmm.boottime "$bt"
else
  fail vmm.boottime "no 'boot-timer: N ms since exec' line in the VMM's output"
fi
