# bench/net's guest side, appended to the test guest's initramfs as /etc/rvirt/test.sh (sourced by
# its /init after the `net` check got a DHCP lease). It serves a file of rvirt.bigmib MiB (default
# 32) and /cgi-bin/pull?ADDR (downloads that file from another guest rvirt.reps times and answers
# "bytes=N ms=M") with busybox httpd on port 8080, then prints RVIRT-READY; rvirt.sleep keeps it up.
mib=$(arg bigmib) || mib=32
reps=$(arg reps) || reps=4
mkdir -p /tmp/www/cgi-bin
dd if=/dev/zero of=/tmp/www/big bs=1048576 count="$mib" 2>/dev/null
cat >/tmp/www/cgi-bin/pull <<CGI
#!/bin/sh
t0=\$(awk '{ printf "%d", \$1 * 1000 }' /proc/uptime)
i=0
while [ \$i -lt $reps ]; do wget -O /dev/null "http://\$QUERY_STRING:8080/big" 2>/dev/null || break; i=\$((i + 1)); done
t1=\$(awk '{ printf "%d", \$1 * 1000 }' /proc/uptime)
printf 'Content-Type: text/plain\r\n\r\nbytes=%d ms=%d\n' \$((i * $mib * 1048576)) \$((t1 - t0))
CGI
chmod +x /tmp/www/cgi-bin/pull
httpd -p 8080 -h /tmp/www && echo "RVIRT-READY $(cat /tmp/dhcp-ip 2>/dev/null)"
