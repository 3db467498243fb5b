# Guest-side steps of net-e2e.sh, appended to the test guest's initramfs as /etc/rvirt/test.sh and
# sourced by its /init after the `net` check (DHCP lease, ping of the router or a given peer).
# Arguments (guest kernel command line):
#   rvirt.peer=NAME        the other guest: resolve NAME through the network's DNS (dnsmasq) and ping it
#   rvirt.gw=ADDR          ping the gateway ADDR (default: the router DHCP gave)
#   rvirt.outside=URL      fetch URL (an outside namespace's CGI that answers the client address it saw)
#   rvirt.expect=nat|isolated
#                          nat: the outside must answer and must have seen an address other than ours
#                          (the host's, through masquerade); isolated: the outside must be unreachable
# Results: RVIRT-PASS/FAIL dns, peer, gw, outside.
own=$(cat /tmp/dhcp-ip 2>/dev/null)
if peer=$(arg peer); then
  # The peer may still be booting: wait up to 60 s for dnsmasq to know its name.
  n=0 paddr=
  while [ $n -lt 60 ]; do
    paddr=$(nslookup "$peer" 2>/dev/null | sed -n '/^Name:/,$ s/^Address:*[[:space:]]*\([0-9.]*\).*/\1/p' | head -n1)
    [ -n "$paddr" ] && break
    sleep 1
    n=$((n + 1))
  done
  if [ -n "$paddr" ]; then
    pass dns "$peer -> $paddr (after ${n}s)"
    # dnsmasq knows the name from the peer's DHCP request, a little before the peer has put the
    # address on its interface: retry for up to 60 s.
    n=0
    while ! ping -c 1 -w 3 "$paddr" >/dev/null 2>&1 && [ $n -lt 20 ]; do n=$((n + 1)); done
    if [ $n -lt 20 ]; then
      pass peer "$own -> $peer $paddr"
    else
      fail peer "$own cannot ping $peer at $paddr"
    fi
  else
    fail dns "nslookup $peer gave no address in 60 s ($(cat /etc/resolv.conf 2>/dev/null | tr '\n' ' '))"
    fail peer "no address for $peer"
  fi
fi
gw=$(arg gw) || gw=$(cat /tmp/router 2>/dev/null)
if [ -n "$gw" ]; then
  if ping -c 1 -w 5 "$gw" >/dev/null 2>&1; then pass gw "$gw"; else fail gw "cannot ping $gw"; fi
fi
if url=$(arg outside); then
  # An isolated network gives no default route; add one through the gateway anyway, so that
  # "unreachable" means the host refused to forward, not that the guest had no route.
  if [ "$(arg expect)" = isolated ] && [ -n "$gw" ] && ! ip route | grep -q '^default'; then
    ip route add default via "$gw"
  fi
  seen=$(timeout 15 wget -O - "$url" 2>/dev/null | sed -n 's/.*[^0-9]\([0-9]*\.[0-9]*\.[0-9]*\.[0-9]*\).*/\1/p;s/^\([0-9]*\.[0-9]*\.[0-9]*\.[0-9]*\)$/\1/p' | head -n1)
  case "$(arg expect)" in
    isolated)
      if [ -z "$seen" ]; then pass outside "unreachable, as it must be"; else fail outside "reached $url (it saw $seen)"; fi
      ;;
    *)
      if [ -z "$seen" ]; then
        fail outside "no answer from $url"
      elif [ "$seen" = "$own" ]; then
        fail outside "the outside saw the guest's own address $own: no masquerade"
      else
        pass outside "the outside saw $seen, not $own"
      fi
      ;;
  esac
fi
