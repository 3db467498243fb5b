# The installer of guest/install-iso's CD, sourced by the guest's /init after its checks (pass,
# fail, arg and wait_for available). With the disc in the CD-ROM drive it reads the disc and
# "installs": copies the disc (a hybrid image that firmware boots from a disk too) onto the
# first virtio disk. With the drive empty it is the installed system, booted from that disk.
for m in $(cat /lib/modules/cd/order); do
  # The order repeats the virtio core the guest's /init has loaded already.
  [ -d "/sys/module/$(echo "$m" | tr - _)" ] && continue
  insmod "/lib/modules/cd/$m.ko" || fail "insmod $m"
done
token=$(cat /etc/rvirt/token)
if ! wait_for /dev/sr0; then
  fail cd.drive "no /dev/sr0: the CD-ROM drive was not found ($(ls /sys/class/scsi_device 2>/dev/null))"
elif mkdir -p /mnt && mount -t iso9660 -o ro /dev/sr0 /mnt 2>/tmp/mount.err; then
  pass cd.drive "sr0 $(cat /sys/block/sr0/device/vendor) $(cat /sys/block/sr0/device/model)"
  got=$(cat /mnt/rvirt/token 2>/dev/null)
  if [ "$got" = "$token" ]; then pass cd.read "/rvirt/token from the disc"; else fail cd.read "read '$got' want '$token'"; fi
  t0=$(cut -d' ' -f1 /proc/uptime)
  if wait_for /dev/vda && dd if=/dev/sr0 of=/dev/vda bs=65536 conv=fsync 2>/tmp/dd.err; then
    t1=$(cut -d' ' -f1 /proc/uptime)
    pass install.copy "$(cat /sys/block/sr0/size) sectors to vda in $(awk "BEGIN { print $t1 - $t0 }") s"
  else
    fail install.copy "$(cat /tmp/dd.err)"
  fi
  umount /mnt
else
  # The drive is there but empty: this is the installed system, started from the disk.
  if wait_for /dev/vda && [ "$(dd if=/dev/vda bs=2048 skip=16 count=1 2>/dev/null | dd bs=1 skip=1 count=5 2>/dev/null)" = CD001 ]; then
    pass installed.boot "from vda (an empty sr0: $(head -c 80 /tmp/mount.err))"
  else
    fail installed.boot "sr0 has no disc and vda holds no installed system"
  fi
fi
