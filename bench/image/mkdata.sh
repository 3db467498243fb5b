#!/usr/bin/env bash
# Makes the benchmark source: a raw image of SIZE (default 2G) whose every other 4 MiB block
# holds data (base64 text: compressible, but not trivially) and the rest are holes.
set -euo pipefail
out=$1
size=${2:-2G}
bytes=$(numfmt --from=iec "$size")
truncate -s 0 "$out"
truncate -s "$bytes" "$out"
block=$((4 << 20))
chunk=$(mktemp)
trap 'rm -f "$chunk"' EXIT
head -c $((block * 3 / 4)) /dev/urandom | base64 -w 0 >"$chunk"
for ((i = 0; i < bytes / block; i += 2)); do
  dd if="$chunk" of="$out" bs="$block" seek="$i" conv=notrunc status=none
done
