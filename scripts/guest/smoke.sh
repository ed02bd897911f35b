#!/usr/bin/env bash
# Smoke test of the test guest under QEMU TCG: workload + ACPI power-down, verify,
# crash (kill -9) + verify, acpi=ignore, ddbench, qemu-guest-agent fsfreeze/thaw
# (the product's q35 + virtio-serial setup). Exits non-zero on any failed check.
#
#   scripts/guest/smoke.sh [GUEST_DIR]      (default: <repo>/target/guest)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
GUEST=${1:-$REPO/target/guest}
"$HERE/build.sh" "$GUEST" >/dev/null
KERNEL=$GUEST/vmlinuz
INITRD=$GUEST/initrd.img
command -v qemu-system-x86_64 >/dev/null || { echo "missing qemu-system-x86_64: apt-get install qemu-system-x86" >&2; exit 1; }
command -v python3 >/dev/null || { echo "missing python3" >&2; exit 1; }

T=$(mktemp -d /tmp/bulwark-guest-smoke.XXXXXX)
QPID=
cleanup() {
    [[ -n $QPID ]] && kill -9 "$QPID" 2>/dev/null || true
    rm -rf "$T"
}
trap cleanup EXIT
fail() {
    echo "FAIL: $*" >&2
    [[ -n ${NAME:-} && -f $T/$NAME.log ]] && { echo "--- $NAME serial log (tail):" >&2; tail -n 40 "$T/$NAME.log" | tr -d '\r' >&2; }
    exit 1
}

# machine and extra devices for boot(); steps 7-8 switch to the product's setup
HW=(-accel tcg)
# boot NAME DISK APPEND... : start a guest in the background (sets NAME, QPID, T0)
boot() {
    NAME=$1 DISK=$2
    shift 2
    T0=$(date +%s%N)
    qemu-system-x86_64 "${HW[@]}" -m 256 -nographic -no-reboot -display none -monitor none \
        -kernel "$KERNEL" -initrd "$INITRD" -append "console=ttyS0 panic=-1 $*" \
        -drive "file=$DISK,format=raw,if=virtio" -serial "file:$T/$NAME.log" \
        -qmp "unix:$T/$NAME.qmp,server=on,wait=off" </dev/null >"$T/$NAME.out" 2>&1 &
    QPID=$!
}
# wait_line REGEX [TIMEOUT_S]: wait for a serial line matching REGEX, print it (sets LINE)
wait_line() {
    local re=$1 deadline=$((SECONDS + ${2:-90}))
    while ((SECONDS < deadline)); do
        LINE=$(tr -d '\r' 2>/dev/null <"$T/$NAME.log" | grep -a -m1 -E "$re" || true)
        [[ -n $LINE ]] && { echo "  $NAME: $LINE"; return 0; }
        kill -0 "$QPID" 2>/dev/null || fail "$NAME: qemu exited before a line matching /$re/"
        sleep 0.2
    done
    fail "$NAME: timeout waiting for /$re/"
}
# wait_exit [TIMEOUT_S]: wait for qemu to exit by itself
wait_exit() {
    local deadline=$((SECONDS + ${1:-30}))
    while kill -0 "$QPID" 2>/dev/null; do
        ((SECONDS < deadline)) || fail "$NAME: qemu did not exit"
        sleep 0.2
    done
    wait "$QPID" 2>/dev/null || true
    QPID=
}
# qmp CMD...: run QMP commands on the current guest
qmp() {
    python3 - "$T/$NAME.qmp" "$@" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
def cmd(name):
    f.write(json.dumps({"execute": name}) + "\n"); f.flush()
    while True:  # skip asynchronous events
        r = json.loads(f.readline())
        if "return" in r or "error" in r: return r
json.loads(f.readline())  # greeting
cmd("qmp_capabilities")
for c in sys.argv[2:]:
    r = cmd(c)
    if "error" in r: sys.exit("qmp %s: %s" % (c, r["error"]))
PY
}
# chardev_open LABEL: frontend-open of chardev LABEL from QMP query-chardev (true|false)
chardev_open() {
    python3 - "$T/$NAME.qmp" "$1" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
def cmd(name):
    f.write(json.dumps({"execute": name}) + "\n"); f.flush()
    while True:  # skip asynchronous events
        r = json.loads(f.readline())
        if "return" in r or "error" in r: return r
json.loads(f.readline())  # greeting
cmd("qmp_capabilities")
for c in cmd("query-chardev")["return"]:
    if c["label"] == sys.argv[2]:
        print(str(c["frontend-open"]).lower())
        break
else:
    sys.exit("query-chardev: no chardev " + sys.argv[2])
PY
}
# qga CMD: a guest agent command the way the product sends it (new connection,
# guest-sync with a fresh id, read until its return, then CMD); prints "RETURN MS"
qga() {
    python3 - "$T/$NAME.qga" "$1" <<'PY'
import json, random, socket, sys, time
s = socket.socket(socket.AF_UNIX); s.settimeout(30); s.connect(sys.argv[1]); f = s.makefile("rw")
def send(obj): f.write(json.dumps(obj) + "\n"); f.flush()
def recv():
    while True:
        line = f.readline()
        if not line: sys.exit("qga: connection closed")
        try: return json.loads(line)
        except ValueError: pass  # stale bytes from an earlier session
n = random.randrange(1, 2**31)
send({"execute": "guest-sync", "arguments": {"id": n}})
while recv() != {"return": n}: pass
t = time.monotonic()
send({"execute": sys.argv[2]})
r = recv()
if "error" in r: sys.exit("qga %s: %s" % (sys.argv[2], r["error"]))
print(json.dumps(r["return"]), round((time.monotonic() - t) * 1000))
PY
}
# nwrote: number of wrote= lines so far
nwrote() { tr -d '\r' <"$T/$NAME.log" | grep -ac '^BULWARK-GUEST wrote=' || true; }
# field KEY: value of KEY=... in LINE
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$LINE"; }
ready() { # ready: wait for the ready line, record timings
    wait_line '^BULWARK-GUEST (ready|error) '
    [[ $LINE == *" ready "* ]] || fail "$NAME: $LINE"
    local wall=$((($(date +%s%N) - T0) / 1000000))
    TIMINGS+="  $NAME: ready_ms=$(field ready_ms) (guest uptime), ~${wall} ms wall from qemu start"$'\n'
}
expect() { [[ $(field "$1") == "$2" ]] || fail "$NAME: expected $1=$2 in: $LINE"; }
TIMINGS=

DISK=$T/disk.raw
truncate -s 64M "$DISK"

echo "1. workload on a blank disk, then ACPI power-down"
boot w1 "$DISK" bulwark.mode=workload bulwark.interval_ms=100
ready
expect fs new
wait_line '^BULWARK-GUEST wrote=30 '
qmp system_powerdown
wait_line '^BULWARK-GUEST shutdown '
expect clean 1
expect io_errors 0
W1=$(field wrote)
wait_exit

echo "2. verify after clean shutdown"
boot v1 "$DISK" bulwark.mode=verify
ready
expect fs clean
expect bad 0
expect verified "$W1"
wait_line '^BULWARK-GUEST verify-done '
wait_exit

echo "3. workload killed with kill -9 mid-write, then verify"
boot w2 "$DISK" bulwark.mode=workload bulwark.interval_ms=0
ready
expect fs clean
wait_line '^BULWARK-GUEST wrote=20 '
kill -9 "$QPID"
wait "$QPID" 2>/dev/null || true
QPID=
boot v2 "$DISK" bulwark.mode=verify
ready
expect fs recovered
expect bad 0
(($(field verified) >= W1 + 20)) || fail "v2: expected at least $((W1 + 20)) verified files: $LINE"
wait_line '^BULWARK-GUEST verify-done '
wait_exit

echo "4. acpi=ignore: power-down is ignored, the host quits"
boot w3 "$DISK" bulwark.mode=workload bulwark.files=5 bulwark.interval_ms=0 bulwark.acpi=ignore
ready
wait_line '^BULWARK-GUEST done '
expect wrote 5
qmp system_powerdown
sleep 5
kill -0 "$QPID" 2>/dev/null || fail "w3: guest went down despite acpi=ignore"
grep -aq 'BULWARK-GUEST shutdown' "$T/w3.log" && fail "w3: shutdown line despite acpi=ignore"
echo "  w3: still running 5 s after system_powerdown"
qmp quit
wait_exit

echo "5. bulwark.files reached: the guest stays up, then honours the power button"
boot w4 "$DISK" bulwark.mode=workload bulwark.files=5 bulwark.interval_ms=0
ready
expect fs recovered
wait_line '^BULWARK-GUEST done '
sleep 3
kill -0 "$QPID" 2>/dev/null || fail "w4: guest went down after done"
qmp system_powerdown
wait_line '^BULWARK-GUEST shutdown '
expect clean 1
expect wrote 5
wait_exit

echo "6. ddbench on a 300 MiB disk"
DD=$T/dd.raw
truncate -s 300M "$DD"
boot d1 "$DD" bulwark.mode=ddbench bulwark.ddsize_mib=256
ready
expect fs none
wait_line '^BULWARK-GUEST dd '
expect bytes $((256 * 1024 * 1024))
expect io_errors 0
wait_exit

echo "7. qemu-guest-agent (product setup: q35, -cpu max, virtio-serial): freeze, thaw"
QD=$T/qga.raw
truncate -s 64M "$QD"
qga_hw() { # qga_hw NAME: the product's machine and guest agent channel
    HW=(-machine q35,accel=tcg -cpu max
        -chardev "socket,id=qga0,path=$T/$1.qga,server=on,wait=off"
        -device virtio-serial-pci,id=vser0
        -device virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0)
}
qga_hw g1
boot g1 "$QD" bulwark.mode=workload bulwark.interval_ms=50 bulwark.qga=1
wait_line '^BULWARK-GUEST (qga started|warn reason=qga-failed|error) '
[[ $LINE == *" qga started "* ]] || fail "g1: $LINE"
ready
expect fs new
[[ $(chardev_open qga0) == true ]] || fail "g1: query-chardev: qga0 frontend-open is not true"
echo "  g1: query-chardev qga0 frontend-open=true"
wait_line '^BULWARK-GUEST wrote=10 '
t10=$SECONDS
wait_line '^BULWARK-GUEST wrote=20 '
# frozen window: at least 3 s and twice the time the last 10 files took
HOLD=$((2 * (SECONDS - t10) > 3 ? 2 * (SECONDS - t10) : 3))
OUT=$(qga guest-fsfreeze-freeze) || fail "g1: guest-fsfreeze-freeze failed"
read -r RET FREEZE_MS <<<"$OUT"
[[ $RET == 1 ]] || fail "g1: guest-fsfreeze-freeze froze $RET filesystems, expected 1"
OUT=$(qga guest-fsfreeze-status) || fail "g1: guest-fsfreeze-status failed"
[[ $OUT == '"frozen" '* ]] || fail "g1: guest-fsfreeze-status: $OUT"
sleep 0.5 # a file that was complete when the freeze came may still be reported
n0=$(nwrote)
sleep "$HOLD"
n1=$(nwrote)
((n1 == n0)) || fail "g1: the workload went on while frozen ($n0 -> $n1 wrote= lines in $HOLD s)"
echo "  g1: frozen in $FREEZE_MS ms (1 filesystem), status frozen, no wrote= line for $HOLD s"
OUT=$(qga guest-fsfreeze-thaw) || fail "g1: guest-fsfreeze-thaw failed"
read -r RET THAW_MS <<<"$OUT"
[[ $RET == 1 ]] || fail "g1: guest-fsfreeze-thaw thawed $RET filesystems, expected 1"
OUT=$(qga guest-fsfreeze-status) || fail "g1: guest-fsfreeze-status failed"
[[ $OUT == '"thawed" '* ]] || fail "g1: guest-fsfreeze-status after thaw: $OUT"
deadline=$((SECONDS + 20))
until (($(nwrote) > n1)); do
    ((SECONDS < deadline)) || fail "g1: no progress within 20 s after thaw"
    sleep 0.2
done
LINE=$(tr -d '\r' <"$T/g1.log" | grep -a '^BULWARK-GUEST wrote=' | tail -n1)
echo "  g1: thawed in $THAW_MS ms, resumed: $LINE"
expect io_errors 0
# frozen again when the power button comes: /init thaws, then shuts down cleanly
OUT=$(qga guest-fsfreeze-freeze) || fail "g1: second guest-fsfreeze-freeze failed"
[[ $OUT == '1 '* ]] || fail "g1: second guest-fsfreeze-freeze: $OUT"
qmp system_powerdown
wait_line '^BULWARK-GUEST shutdown '
expect clean 1
expect io_errors 0
expect thawed 1
G1=$(field wrote)
wait_exit
TIMINGS+="  g1: guest-fsfreeze-freeze ${FREEZE_MS} ms, guest-fsfreeze-thaw ${THAW_MS} ms (after guest-sync)"$'\n'

echo "8. same disk and setup without bulwark.qga=1 (idle): verify, frontend-open false"
qga_hw g2
boot g2 "$QD" bulwark.mode=idle
ready
expect fs clean
expect bad 0
expect verified "$G1"
grep -aq 'BULWARK-GUEST qga' "$T/g2.log" && fail "g2: qga line without bulwark.qga=1"
[[ $(chardev_open qga0) == false ]] || fail "g2: query-chardev: qga0 frontend-open is not false"
echo "  g2: query-chardev qga0 frontend-open=false"
qmp system_powerdown
wait_line '^BULWARK-GUEST shutdown '
expect clean 1
wait_exit

echo "boot to ready line:"
printf '%s' "$TIMINGS"
echo "PASS"
