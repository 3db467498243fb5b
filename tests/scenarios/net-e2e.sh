# Virtual networks end to end with real guests: rvirtd + rvirt + rvirt-vmm in the test host.
#   NAT `default`: two guests get leases from dnsmasq, resolve and ping each other and the gateway,
#   reach an "outside" namespace only through masquerade (the outside sees the host's address);
#   net-dhcp-leases and domifaddr show them; net-destroy is refused while they run, net-undefine
#   while domains use the network; rvirtd restarts with the network and its dnsmasq kept; then
#   --force. Start/destroy cycles of a guest: no TAP left, dnsmasq still the one process, one lease
#   per MAC. Isolated network: guests reach each other, not the outside. Bridge mode: a guest's TAP
#   on a test bridge, the guest pings the bridge's address.
# Arguments: rvirt.cycles=N (default 3) guest start/poweroff cycles on the NAT network.
. /lib/rvirt/scenario.sh
IP=/usr/sbin/ip
cycles=$(arg cycles) || cycles=3
STATE=/var/lib/rvirt
RUN=/run/rvirt
mkdir -p "$STATE" "$RUN" /tmp/net

# check NAME CMD... — pass NAME if CMD succeeds, else fail with its output.
check() {
  name=$1
  shift
  if out=$("$@" 2>&1); then pass "$name" "$(echo "$out" | tr '\n' ' ' | cut -c1-200)"; else fail "$name" "$* failed: $(echo "$out" | tr '\n' ' ' | cut -c1-300)"; fi
}
# refused NAME WANT CMD... — CMD must fail and its error must contain WANT.
refused() {
  name=$1 want=$2
  shift 2
  if out=$("$@" 2>&1); then
    fail "$name" "$* succeeded: $out"
  elif echo "$out" | grep -q -- "$want"; then
    pass "$name" "$(echo "$out" | tr '\n' ' ' | cut -c1-240)"
  else
    fail "$name" "$* failed without '$want': $out"
  fi
}

start_rvirtd() {
  rvirtd --state-dir "$STATE" --run-dir "$RUN" >>/tmp/rvirtd.log 2>&1 &
  RVIRTD=$!
  n=0
  while ! rvirt list >/dev/null 2>&1; do
    n=$((n + 1))
    [ $n -gt 100 ] && { fail rvirtd "did not answer in 10 s: $(tail -n 5 /tmp/rvirtd.log)"; return 1; }
    sleep 0.1
  done
}

# domain NAME NETWORK INITRD CMDLINE [MAC] — writes /tmp/net/NAME.xml and defines it.
domain() {
  mac=
  [ -n "$5" ] && mac="<mac address='$5'/>"
  cat >"/tmp/net/$1.xml" <<XML
<domain type='kvm'>
  <name>$1</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type><kernel>$GUEST_VMLINUX</kernel><initrd>$3</initrd><cmdline>$4</cmdline></os>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <interface type='$6'><source $7='$2'/>$mac<model type='virtio'/></interface>
  </devices>
</domain>
XML
  rvirt define "/tmp/net/$1.xml" >/dev/null || fail "define.$1" "rvirt define failed"
}

# boot NAME — starts the domain with its console in /tmp/net/NAME.log (tagged "NAME| " on ours).
# The console's input stays open (a sleep's pipe): rvirtd ends a console session shortly after
# the client's input ends, and the guest's lines come seconds later.
boot() {
  { sleep 900 | rvirt start "$1" --console 2>&1 | tr -d '\r' | tee "/tmp/net/$1.log" | sed "s/^/$1| /"; } &
}

# wait_done SECS NAME... — waits until each guest printed RVIRT-DONE; reports NAME.<check> for the
# guest's result lines and NAME.done.
wait_done() {
  limit=$1
  shift
  t=0
  while [ $t -lt $((limit * 10)) ]; do
    all=1
    for g in "$@"; do grep -q '^RVIRT-DONE' "/tmp/net/$g.log" 2>/dev/null || all=0; done
    [ $all = 1 ] && break
    sleep 0.1
    t=$((t + 1))
  done
  for g in "$@"; do
    grep -E '^RVIRT-(PASS|FAIL) ' "/tmp/net/$g.log" | while read -r kind c rest; do
      if [ "$kind" = RVIRT-PASS ]; then pass "$g.$c" "$rest"; else fail "$g.$c" "$rest"; fi
    done
    if grep -q '^RVIRT-DONE' "/tmp/net/$g.log"; then pass "$g.done"; else fail "$g.done" "no RVIRT-DONE in ${limit}s"; fi
  done
  echo "RVIRT-TIME $(echo "$@" | tr ' ' '+') $((t * 100))"
}

taps() { ls /sys/class/net | grep '^rvnet' | tr '\n' ' '; }
dnsmasq_pid() { cat "$RUN/networks/$1.pid" 2>/dev/null; }

# --- the test host's own network world -------------------------------------------------------
for m in veth bridge tun nf_tables nft_ct nft_masq nft_nat nft_chain_nat nft_reject_inet; do
  grep -q "^$m " /proc/modules || fail "host.module.$m" "not loaded"
done
check host.tools sh -c 'nft --version && dnsmasq --version | head -n1 && /usr/sbin/ip -V'

# The outside: a namespace behind a veth pair with no route back to any guest subnet; a CGI there
# answers and records the client address it saw.
mkdir -p /tmp/www/cgi-bin
cat >/tmp/www/cgi-bin/whoami <<'CGI'
#!/bin/sh
echo "$REMOTE_ADDR" >>/tmp/outside-seen
printf 'Content-Type: text/plain\r\n\r\n%s\n' "$REMOTE_ADDR"
CGI
chmod +x /tmp/www/cgi-bin/whoami
if $IP netns add outside && $IP link add vh0 type veth peer name vo0 && $IP link set vo0 netns outside &&
  $IP addr add 10.99.0.1/24 dev vh0 && $IP link set vh0 up &&
  $IP -n outside addr add 10.99.0.2/24 dev vo0 && $IP -n outside link set vo0 up &&
  $IP -n outside link set lo up; then
  $IP netns exec outside httpd -f -p 8080 -h /tmp/www &
  HTTPD=$!
  pass host.outside "namespace 'outside' at 10.99.0.2, host side 10.99.0.1"
else
  fail host.outside "cannot create the outside namespace"
fi
OUTSIDE=http://10.99.0.2:8080/cgi-bin/whoami

start_rvirtd || exit 1
check net.default.defined sh -c 'rvirt net-list --all | grep -w default'
check net.default.start rvirt net-start default
sub=$(rvirt net-dumpxml default | sed -n "s/.*<ip address='\([0-9.]*\)'.*/\1/p")
[ -n "$sub" ] || fail net.default.ip "no <ip address=> in net-dumpxml default"
echo "default network gateway $sub"
check net.default.bridge sh -c "ip addr show rvirbr0 | grep -w $sub"
check net.default.forwarding sh -c 'test "$(cat /proc/sys/net/ipv4/ip_forward)" = 1'
check net.default.nft sh -c 'nft list table ip rvirt | grep -c masquerade'

# --- two guests on the NAT network --------------------------------------------------------------
initrd_with_test /scenarios/net-guest.sh /tmp/net/initrd.cpio >/dev/null || fail initrd "cannot build the guest initramfs"
nat_cmd() {
  echo "$GUEST_CMDLINE rvirt.check=net rvirt.net=dhcp rvirt.hostname=$1 rvirt.peer=$2 rvirt.outside=$OUTSIDE rvirt.expect=nat rvirt.sleep=600"
}
domain g1 default /tmp/net/initrd.cpio "$(nat_cmd g1 g2)" "" network network
domain g2 default /tmp/net/initrd.cpio "$(nat_cmd g2 g1)" "" network network
boot g1
boot g2
wait_done 150 g1 g2

leases=$(rvirt net-dhcp-leases default)
echo "$leases"
for g in g1 g2; do
  if echo "$leases" | grep -qw "$g"; then pass "leases.$g" "$(echo "$leases" | grep -w "$g")"; else fail "leases.$g" "not in net-dhcp-leases default"; fi
  a=$(rvirt domifaddr "$g" | grep -o '[0-9.]*/[0-9]*' | head -n1)
  ip=$(sed -n 's/^RVIRT-PASS net .* \([0-9.]*\)\/dhcp .*/\1/p' "/tmp/net/$g.log")
  if [ -n "$a" ] && [ "${a%/*}" = "$ip" ]; then pass "domifaddr.$g" "$a"; else fail "domifaddr.$g" "domifaddr says '$a', the guest got '$ip'"; fi
done
# The guests' addresses from the leases (the outside must never have seen them).
g1ip=$(echo "$leases" | awk '$0 ~ / g1 / {sub("/.*", "", $5); print $5}')
g2ip=$(echo "$leases" | awk '$0 ~ / g2 / {sub("/.*", "", $5); print $5}')
seen=$(sort -u /tmp/outside-seen 2>/dev/null | tr '\n' ' ')
case "$seen" in
  *10.99.0.1*)
    if [ -z "$g1ip" ] || [ -z "$g2ip" ]; then
      fail outside.saw "no lease addresses to compare with (g1 '$g1ip', g2 '$g2ip')"
    elif echo "$seen" | grep -qE "([^0-9]|^)($g1ip|$g2ip)([^0-9]|$)"; then
      fail outside.saw "the outside saw a guest address: $seen"
    else
      pass outside.saw "the outside saw only the host's address: $seen"
    fi
    ;;
  *) fail outside.saw "the outside saw '$seen', not the host's 10.99.0.1" ;;
esac

# --- refusals while guests run, daemon restart ----------------------------------------------------
refused net.destroy.refused "attached" rvirt net-destroy default
check net.destroy.still-active sh -c 'rvirt net-list | grep -w default | grep -w active'
echo "domains before the rvirtd restart:"
rvirt list --all
pid1=$(dnsmasq_pid default)
kill "$RVIRTD"
wait "$RVIRTD" 2>/dev/null
start_rvirtd || exit 1
pid2=$(dnsmasq_pid default)
if [ -n "$pid1" ] && [ "$pid1" = "$pid2" ] && [ -d "/proc/$pid1" ]; then
  pass restart.dnsmasq "dnsmasq $pid1 kept across the rvirtd restart"
else
  fail restart.dnsmasq "dnsmasq pid before '$pid1', after '$pid2'"
fi
check restart.active sh -c 'rvirt net-list | grep -w default | grep -w active'
# Re-attached: both still active (running, or "in shutdown" if the VMM reported the guest's ACPI
# PM writes as shutting down), not shut off.
doms=$(rvirt list --all 2>&1)
vpid=$(sed -n 's/.*"pid": *\([0-9][0-9]*\).*/\1/p' "$RUN/g1/vmm.json" 2>/dev/null | head -n1)
if echo "$doms" | grep -w g1 | grep -qvE 'shut off' && echo "$doms" | grep -w g2 | grep -qvE 'shut off' &&
  [ -n "$vpid" ] && [ -d "/proc/$vpid" ]; then
  pass restart.domains "g1's VMM $vpid still runs; re-attached: $(echo "$doms" | grep -wE 'g1|g2' | tr -s ' ' | tr '\n' ';')"
else
  fail restart.domains "after the restart (g1's VMM pid '$vpid'): $(echo "$doms" | tr '\n' ' ')"
fi
check restart.leases sh -c 'rvirt net-dhcp-leases default | grep -w g1 && rvirt net-dhcp-leases default | grep -w g2'
check restart.taps sh -c "ls /sys/class/net/rvirbr0/brif | grep -c rvnet | grep -qx 2"
refused net.destroy.refused-after-restart "attached" rvirt net-destroy default
check net.destroy.force rvirt net-destroy --force default
if [ -z "$(taps)" ]; then pass net.destroy.force.taps; else fail net.destroy.force.taps "left: $(taps)"; fi
if [ -n "$pid1" ] && [ ! -d "/proc/$pid1" ]; then pass net.destroy.force.dnsmasq; else fail net.destroy.force.dnsmasq "dnsmasq $pid1 still runs"; fi
rvirt destroy g1 >/dev/null 2>&1
rvirt destroy g2 >/dev/null 2>&1
refused net.undefine.refused "g1" rvirt net-undefine default

# --- start/poweroff cycles on the NAT network ------------------------------------------------------
check net.default.restart rvirt net-start default
domain c1 default "$GUEST_INITRD" "$GUEST_CMDLINE rvirt.check=net rvirt.net=dhcp rvirt.hostname=c1" 52:54:00:0c:00:01 network network
dpid=$(dnsmasq_pid default)
i=1
ok=1
while [ $i -le "$cycles" ]; do
  rm -f /tmp/net/c1.log
  boot c1
  wait_done 90 c1 >/tmp/net/c1.results
  grep -q 'RVIRT-FAIL' /tmp/net/c1.results && { ok=0; cat /tmp/net/c1.results; }
  n=0
  while rvirt domstate c1 2>/dev/null | grep -q running && [ $n -lt 50 ]; do sleep 0.2; n=$((n + 1)); done
  left=$(taps)
  [ -z "$left" ] || { ok=0; fail "cycle.$i.taps" "left: $left"; }
  [ "$(dnsmasq_pid default)" = "$dpid" ] || { ok=0; fail "cycle.$i.dnsmasq" "dnsmasq changed"; }
  i=$((i + 1))
done
nl=$(grep -ci '52:54:00:0c:00:01' "$RUN/networks/default.leases")
if [ $ok = 1 ] && [ "$nl" = 1 ]; then
  pass cycles "$cycles guest boots on 'default': no TAP left, dnsmasq $dpid kept, 1 lease for c1's MAC"
else
  fail cycles "ok=$ok, lease entries for c1's MAC: $nl"
fi
check cycles.domstate sh -c 'rvirt domstate c1 | grep -w "shut off"'

# --- isolated network -----------------------------------------------------------------------------
cat >/tmp/net/iso.xml <<'XML'
<network>
  <name>iso</name>
  <bridge name='rvirbr9'/>
  <ip address='192.168.150.1' netmask='255.255.255.0'>
    <dhcp><range start='192.168.150.10' end='192.168.150.50'/></dhcp>
  </ip>
</network>
XML
check net.iso.define rvirt net-define /tmp/net/iso.xml
check net.iso.start rvirt net-start iso
iso_cmd() {
  echo "$GUEST_CMDLINE rvirt.check=net rvirt.net=dhcp,192.168.150.1 rvirt.hostname=$1 rvirt.peer=$2 rvirt.gw=192.168.150.1 rvirt.outside=$OUTSIDE rvirt.expect=isolated rvirt.sleep=600"
}
domain i1 iso /tmp/net/initrd.cpio "$(iso_cmd i1 i2)" "" network network
domain i2 iso /tmp/net/initrd.cpio "$(iso_cmd i2 i1)" "" network network
boot i1
boot i2
wait_done 150 i1 i2
rvirt destroy i1 >/dev/null 2>&1
rvirt destroy i2 >/dev/null 2>&1
check net.iso.destroy rvirt net-destroy iso

# --- bridge mode on a test bridge ------------------------------------------------------------------
cat >/tmp/net/hostbr.xml <<'XML'
<network>
  <name>hostbr</name>
  <forward mode='bridge'/>
  <bridge name='brtest0'/>
</network>
XML
check net.bridge.define rvirt net-define /tmp/net/hostbr.xml
refused net.bridge.missing "does not exist" rvirt net-start hostbr
$IP link add brtest0 type bridge && $IP addr add 10.98.0.1/24 dev brtest0 && $IP link set brtest0 up ||
  fail net.bridge.create "cannot create brtest0"
check net.bridge.start rvirt net-start hostbr
domain b1 hostbr "$GUEST_INITRD" "$GUEST_CMDLINE rvirt.check=net rvirt.net=10.98.0.2/24,10.98.0.1 rvirt.sleep=600" "" network network
boot b1
wait_done 90 b1
brif=$(ls /sys/class/net/brtest0/brif 2>/dev/null | tr '\n' ' ')
case "$brif" in *rvnet*) pass net.bridge.port "brtest0 ports: $brif" ;; *) fail net.bridge.port "brtest0 ports: '$brif'" ;; esac
rvirt destroy b1 >/dev/null 2>&1
if [ -z "$(taps)" ] && [ -z "$(ls /sys/class/net/brtest0/brif 2>/dev/null)" ]; then pass net.bridge.cleaned; else fail net.bridge.cleaned "left: $(taps)"; fi
check net.bridge.destroy rvirt net-destroy hostbr
check net.bridge.kept sh -c '/usr/sbin/ip link show brtest0'

# --- everything stopped: nothing of rvirt's left ----------------------------------------------------
check net.default.destroy rvirt net-destroy default
left=$(ls /sys/class/net | grep -E '^(rvnet|rvirbr)' | tr '\n' ' ')
nft_left=$(nft list tables 2>&1 | grep -w rvirt)
dm=$(ps | grep -c '[d]nsmasq')
if [ -z "$left" ] && [ -z "$nft_left" ] && [ "$dm" = 0 ]; then pass net.clean "no rvirt links, no 'ip rvirt' table, no dnsmasq"; else fail net.clean "links '$left', nft '$nft_left', dnsmasq processes $dm"; fi

kill "$RVIRTD" 2>/dev/null
[ -n "${HTTPD:-}" ] && kill "$HTTPD" 2>/dev/null
echo "--- rvirtd log (last 30 lines)"
tail -n 30 /tmp/rvirtd.log
