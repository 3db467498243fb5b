# Debian's firmware under the test host's KVM, run by Debian's QEMU inside the test host: how long
# OVMF takes to reach its boot manager and its shell, and SeaBIOS its banner and boot attempt.
# Checks the firmware test path independently of rvirt-vmm (docs/firmware-testing.md). Needs
# `--qemu` and the firmware as files:
#   guest/testhost run --outer-qemu patched --qemu --scenario tests/scenarios/ovmf-probe.sh \
#     --file /usr/share/OVMF/OVMF_CODE_4M.fd:/fw/OVMF_CODE_4M.fd \
#     --file /usr/share/OVMF/OVMF_VARS_4M.fd:/fw/OVMF_VARS_4M.fd
# (SeaBIOS is the bios-256k.bin that --qemu installs.) With Debian's QEMU as the *outer* QEMU the
# test host itself aborts once OVMF runs (the BQL assertion the patched QEMU fixes).
#
# Results: fw.ovmf.bds, fw.ovmf.shell, fw.seabios.banner, fw.seabios.boot, each with an
# RVIRT-TIME in milliseconds since the firmware's QEMU started.
. /lib/rvirt/scenario.sh

# wait_for TAG LOG PATTERN LIMIT — report TAG once LOG holds PATTERN (grep -E), with the time
# since $t0; fail it after LIMIT seconds or when the QEMU ($qpid) has gone.
wait_for() {
  while :; do
    ms=$(($(now_ms) - t0))
    if tr -d '\r' <"$2" | grep -q -E "$3"; then
      echo "RVIRT-TIME $1 $ms"
      pass "$1" "'$3' after ${ms} ms"
      return 0
    fi
    if [ "$ms" -ge $(($4 * 1000)) ]; then
      fail "$1" "no '$3' within $4 s"
      return 1
    fi
    if ! kill -0 "$qpid" 2>/dev/null; then
      fail "$1" "QEMU exited before '$3'"
      return 1
    fi
    # Polling costs the emulated CPU the firmware runs on: not too often.
    sleep 1
  done
}

# show TAG LOG — the firmware's console, tagged, without the terminal control sequences.
show() {
  esc=$(printf '\033')
  tr -d '\r' <"$2" | sed -e "s/$esc\[[0-9;?]*[A-Za-z]//g" -e "s/$esc//g" -e "s/^/$1| /"
}

FW_QEMU="qemu-system-x86_64 -enable-kvm -cpu host -M q35 -smp 1 -m 256 -nodefaults -no-reboot
  -display none -vga none -monitor none"
LIMIT=$(arg fwlimit) || LIMIT=300

# OVMF: the code as shipped, read-only; a private copy of the variable store, as libvirt does.
if [ -f /fw/OVMF_CODE_4M.fd ] && [ -f /fw/OVMF_VARS_4M.fd ]; then
  cp /fw/OVMF_VARS_4M.fd /tmp/vars.fd
  : >/tmp/ovmf.log
  t0=$(now_ms)
  # shellcheck disable=SC2086
  $FW_QEMU -serial file:/tmp/ovmf.log \
    -drive if=pflash,format=raw,unit=0,readonly=on,file=/fw/OVMF_CODE_4M.fd \
    -drive if=pflash,format=raw,unit=1,file=/tmp/vars.fd </dev/null >/tmp/ovmf.out 2>&1 &
  qpid=$!
  # BdsDxe prints its boot attempts on the console; with no bootable device OVMF ends in its
  # shell, which greets with a banner and (after its startup.nsh countdown) a prompt.
  wait_for fw.ovmf.bds /tmp/ovmf.log 'BdsDxe' "$LIMIT" &&
    wait_for fw.ovmf.shell /tmp/ovmf.log 'UEFI Interactive Shell|Shell>' "$LIMIT"
  kill "$qpid" 2>/dev/null
  wait "$qpid" 2>/dev/null
  show ovmf /tmp/ovmf.log
  show ovmf-qemu /tmp/ovmf.out
else
  fail fw.ovmf.bds "no /fw/OVMF_CODE_4M.fd and /fw/OVMF_VARS_4M.fd (--file them in)"
fi

# SeaBIOS writes its log to the debug console port (0x402), not the serial port.
: >/tmp/seabios.log
t0=$(now_ms)
# shellcheck disable=SC2086
$FW_QEMU -bios /usr/share/qemu/bios-256k.bin -serial none \
  -chardev file,id=dbg,path=/tmp/seabios.log -device isa-debugcon,iobase=0x402,chardev=dbg \
  </dev/null >/tmp/seabios.out 2>&1 &
qpid=$!
wait_for fw.seabios.banner /tmp/seabios.log 'SeaBIOS \(version' "$LIMIT" &&
  wait_for fw.seabios.boot /tmp/seabios.log 'Booting from|No bootable device' "$LIMIT"
kill "$qpid" 2>/dev/null
wait "$qpid" 2>/dev/null
show seabios /tmp/seabios.log | tail -n 15
show seabios-qemu /tmp/seabios.out
