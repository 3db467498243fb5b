# Helpers for scenarios that drive rvirtd and rvirt inside the test host (busybox sh), sourced
# after /lib/rvirt/scenario.sh. They expect RVIRT_SOCKET, STATE and RUN to be set. Their files
# (rvirtd.log, NAME.con, console.in) go to $RVIRT_TMP (default /tmp).
RVIRT_TMP=${RVIRT_TMP:-/tmp}

# start_daemon — runs rvirtd in the background (its pid in $DAEMON) and waits until it answers.
start_daemon() {
  rvirtd --socket "$RVIRT_SOCKET" --state-dir "$STATE" --run-dir "$RUN" >>"$RVIRT_TMP/rvirtd.log" 2>&1 &
  DAEMON=$!
  n=0
  while [ $n -lt 100 ]; do
    rvirt list --all >/dev/null 2>&1 && return 0
    sleep 0.1
    n=$((n + 1))
  done
  return 1
}

# console_on NAME — `rvirt console NAME` in the background, appending to $RVIRT_TMP/NAME.con. Its
# input is a FIFO nobody writes to (end of input would end the session).
console_on() {
  [ -p "$RVIRT_TMP/console.in" ] || mkfifo "$RVIRT_TMP/console.in"
  rvirt console "$1" <>"$RVIRT_TMP/console.in" >>"$RVIRT_TMP/$1.con" 2>&1 &
  eval "CONSOLE_$1=$!"
}

# console_off NAME — ends the background console of NAME (if still attached).
console_off() {
  eval "p=\$CONSOLE_$1"
  [ -n "$p" ] && kill "$p" 2>/dev/null
  eval "CONSOLE_$1="
}

# wait_console NAME PATTERN SECS — true once $RVIRT_TMP/NAME.con has a line matching PATTERN.
wait_console() {
  n=0
  while [ $n -lt $(($3 * 10)) ]; do
    grep -q "$2" "$RVIRT_TMP/$1.con" 2>/dev/null && return 0
    sleep 0.1
    n=$((n + 1))
  done
  return 1
}

ticks() { grep -c '^RVIRT-TICK' "$RVIRT_TMP/$1.con" 2>/dev/null; }

# state NAME — `rvirt domstate NAME --reason`, e.g. "running (booted)".
state() { rvirt domstate "$1" --reason 2>&1 | head -n 1; }

# wait_state NAME WANT SECS — true once NAME's state with reason is WANT.
wait_state() {
  n=0
  while [ $n -lt $(($3 * 10)) ]; do
    [ "$(state "$1")" = "$2" ] && return 0
    sleep 0.1
    n=$((n + 1))
  done
  return 1
}

# expect_state TEST NAME WANT SECS — a result line for NAME reaching state WANT.
expect_state() {
  if wait_state "$2" "$3" "$4"; then
    pass "$1" "$2: $3"
  else
    fail "$1" "$2 is '$(state "$2")', want '$3' within $4 s"
  fi
}

# field NAME KEY — a number from `rvirt dominfo NAME --json` ("pid", "id").
field() { rvirt dominfo "$1" --json 2>/dev/null | tr -d ' \n' | sed -n "s/.*\"$2\":\([0-9][0-9]*\).*/\1/p"; }

alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }

# run CMD... — runs an rvirt command, printing it and its output (tagged) for the log.
run() {
  out=$("$@" 2>&1)
  rc=$?
  echo "$out" | while IFS= read -r l; do echo "\$ $*| $l"; done
  return $rc
}

dump_logs() {
  sed 's/^/rvirtd| /' "$RVIRT_TMP/rvirtd.log"
  for f in "$STATE"/log/*.log; do
    [ -f "$f" ] && sed "s/^/$(basename "$f" .log).log| /" "$f"
  done
  for f in "$RVIRT_TMP"/*.con; do
    [ -f "$f" ] && tr -d '\r' <"$f" | grep -v '^RVIRT-TICK' | sed "s/^/$(basename "$f" .con).con| /"
  done
}

# check NAME CMD... — pass NAME if CMD succeeds, else fail with its output.
check() {
  name=$1
  shift
  if run "$@"; then pass "$name" "$(echo "$out" | tr '\n' ' ' | cut -c1-200)"; else fail "$name" "$* failed: $(echo "$out" | tr '\n' ' ' | cut -c1-300)"; fi
}

# refused NAME WANT CMD... — CMD must fail and its error must contain WANT.
refused() {
  name=$1 want=$2
  shift 2
  if run "$@"; then
    fail "$name" "$* succeeded: $out"
  elif echo "$out" | grep -q -- "$want"; then
    pass "$name" "$(echo "$out" | tr '\n' ' ' | cut -c1-240)"
  else
    fail "$name" "$* failed without '$want': $out"
  fi
}
