#!/bin/bash
# boot.sh -- boot the host's REAL systemd (/lib/systemd/systemd as PID 1, with journald) inside
# throw-away pid/mount/uts/ipc/net/cgroup namespaces on a machine whose PID 1 is not systemd, and
# tear it down again. The root inside is an overlay (host "/" as read-only lower layer, tmpfs upper
# layer): nothing written inside reaches the host. The network is private (only `lo`).
# Used by tests/support/sdbox.rs; also usable by hand. NOT a security boundary (root inside is root).
#
#   boot.sh run   BASE [NAME]  Foreground for the box's whole life: boots it, writes BASE/state
#                              ("running" or "failed: why"; details in BASE/boot-failure.txt),
#                              waits until the box is gone, removes its cgroup folders, writes
#                              BASE/exit. With SDBOX_LIFELINE=1, EOF on stdin powers the box off
#                              (sdbox.rs holds the write end of a pipe: if the test process dies,
#                              however it dies, the box goes away).
#   boot.sh start BASE [NAME]  For humans: `run` detached in the background; waits for the boot.
#   boot.sh stop  BASE         Poweroff (SIGRTMIN+4), SIGKILL after SDBOX_STOP_TIMEOUT s (default
#                              5), waits for `run` to clean up.
#
# Before systemd starts, BASE/defaults/ (written here: boot target, journald config, masked host
# units) and then BASE/payload/ (yours: units, binaries, config) are copied onto the box's root.
# BASE/sd.pid holds the host PID of the box's systemd; drive it with
#   nsenter -t "$(cat BASE/sd.pid)" -a systemctl status
# Knobs: SDBOX_BOOT_TIMEOUT (s, default 60), SDBOX_STOP_TIMEOUT (s, default 5), SDBOX_UNIT (boot
# target, default sdbox.target), SDBOX_RM_BASE_IF_ORPHANED=1 (`run` removes BASE at exit if the
# process that started it is gone).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=/usr/bin/python3
BOOT_TIMEOUT=${SDBOX_BOOT_TIMEOUT:-60}
STOP_TIMEOUT=${SDBOX_STOP_TIMEOUT:-5}
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

die() { echo "boot.sh: $*" >&2; exit 1; }

preflight() {
  [ "$(id -u)" = 0 ] || die "must be root"
  local b
  for b in /lib/systemd/systemd unshare nsenter setpriv findmnt timeout setsid tar "$PY"; do
    command -v "$b" >/dev/null || die "missing $b"
  done
  grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null || true
  grep -qw overlay /proc/filesystems || die "no overlayfs in /proc/filesystems"
}

# CG2: cgroup2 mount (/sys/fs/cgroup/unified on hybrid hosts, /sys/fs/cgroup on pure v2);
# ORIGCG: our own cgroup v2 path; the box's cgroup is created right below it.
cgroup_paths() {
  CG2=$(findmnt -rn -t cgroup2 -o TARGET | head -n1)
  [ -n "$CG2" ] || die "no cgroup2 mount on the host (pure cgroup v1 is not supported)"
  ORIGCG=$(awk -F: '$1=="0"{print $3}' /proc/self/cgroup)
}

write_defaults() {
  local d=$1 u
  mkdir -p "$d/etc/systemd/system" "$d/etc/systemd/journald.conf.d"
  echo sdbox > "$d/etc/hostname"
  cat > "$d/etc/systemd/system/sdbox.target" <<'EOF'
[Unit]
Description=sdbox minimal test boot target
Requires=sysinit.target sockets.target
After=sysinit.target sockets.target
AllowIsolate=yes
EOF
  # volatile journal, no rate limit: tests read the journal back and must see every line
  printf '[Journal]\nStorage=volatile\nRuntimeMaxUse=128M\nRateLimitBurst=0\n' \
    > "$d/etc/systemd/journald.conf.d/sdbox.conf"
  # host-enabled units we never want in a test boot
  for u in systemd-timesyncd.service systemd-pstore.service postgresql.service getty@tty1.service \
           e2scrub_reap.service apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer \
           e2scrub_all.timer fstrim.timer man-db.timer; do
    ln -sf /dev/null "$d/etc/systemd/system/$u"
  done
}

set_state() { echo "$1" > "$BASE/state.tmp" && mv -f "$BASE/state.tmp" "$BASE/state"; }

# is $1 (still) the box's PID 1? (guards against signalling a recycled PID)
is_box_pid() {
  local pid=$1 cg=$2
  [ -n "$pid" ] && [ -n "$cg" ] || return 1
  awk -F: -v c="${cg#"$CG2"}" '$1 == "0" && ($3 == c || index($3, c "/") == 1) { f = 1 } END { exit !f }' \
    "/proc/$pid/cgroup" 2>/dev/null
}

# halt_box BASE: poweroff, then SIGKILL everything in the box's cgroup. Idempotent, safe early.
halt_box() {
  local base=$1 pid cg i
  pid=$(cat "$base/sd.pid" 2>/dev/null || true)
  cg=$(cat "$base/cgroup" 2>/dev/null || true)
  if is_box_pid "$pid" "$cg"; then
    kill -s RTMIN+4 "$pid" 2>/dev/null || true   # = systemctl poweroff, no dbus round trip
    for i in $(seq $((STOP_TIMEOUT * 40))); do
      [ -d "/proc/$pid" ] || break
      sleep 0.025
    done
  fi
  if [ -n "$cg" ] && [ -d "$cg" ]; then          # poweroff hung, or box still being set up
    if [ -e "$cg/cgroup.kill" ]; then
      echo 1 > "$cg/cgroup.kill" 2>/dev/null || true
    else
      while read -r i; do kill -KILL "$i" 2>/dev/null || true; done \
        < <(find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null)
    fi
  fi
  if is_box_pid "$pid" "$cg"; then kill -KILL "$pid" 2>/dev/null || true; fi  # kills the whole pid ns
}

remove_cgroup() {
  local cg=$1 i
  for i in $(seq 200); do
    [ -d "$cg" ] || return 0
    find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
    [ -d "$cg" ] || return 0
    [ "$i" = 40 ] && [ -e "$cg/cgroup.kill" ] && { echo 1 > "$cg/cgroup.kill" 2>/dev/null || true; }
    sleep 0.025
  done
  return 1
}

X() { timeout 15 nsenter -t "$SDPID" -a -- "$@"; }

boot_failed() {
  {
    echo "$1"
    if [ -n "${SDPID:-}" ] && [ -d "/proc/$SDPID" ] && [ -S "/proc/$SDPID/root/run/systemd/private" ]; then
      echo "== systemctl --failed"; X systemctl --failed --no-pager --full
      echo "== systemctl list-jobs"; X systemctl list-jobs --no-pager --full
      echo "== journal (last 80 lines)"; X journalctl -b --no-pager -n 80
    fi
    echo "== console (last 40 lines)"; tail -n 40 "$BASE/console.log" 2>/dev/null | tr -d '\r'
    echo "== launcher"; cat "$BASE/launch.log" 2>/dev/null
  } > "$BASE/boot-failure.txt" 2>&1
  set_state "failed: $1"
  cat "$BASE/boot-failure.txt" >&2
  exit 1
}

boot_wait() {
  local i state
  for i in $(seq 400); do
    [ -e "$BASE/sd.pid" ] && break
    kill -0 "$LPID" 2>/dev/null || break
    sleep 0.025
  done
  SDPID=$(cat "$BASE/sd.pid" 2>/dev/null || true)
  [ -n "$SDPID" ] || boot_failed "the launcher did not start the box"
  # wait until PID 1 has exec'd systemd and its private bus socket exists, then for boot to finish
  for i in $(seq $((BOOT_TIMEOUT * 40))); do
    [ -d "/proc/$SDPID" ] || boot_failed "the box's init died during setup"
    if [ "$(cat "/proc/$SDPID/comm" 2>/dev/null)" = systemd ] &&
       [ -S "/proc/$SDPID/root/run/systemd/private" ]; then break; fi
    sleep 0.025
  done
  state=$(timeout "$BOOT_TIMEOUT" nsenter -t "$SDPID" -a -- systemctl is-system-running --wait 2>&1 || true)
  [ "$state" = running ] || boot_failed "system state is '$state', not 'running'"
  set_state running
}

on_exit() {
  local rc=$?
  set +e
  trap - TERM INT HUP
  [ -n "$WPID" ] && kill "$WPID" 2>/dev/null
  halt_box "$BASE"                     # no-op if the box is already gone
  [ -n "$LPID" ] && wait "$LPID" 2>/dev/null
  [ -n "$WPID" ] && wait "$WPID" 2>/dev/null
  if ! remove_cgroup "$CG"; then echo "boot.sh: could not remove cgroup $CG" >&2; rc=1; fi
  echo "$rc" > "$BASE/exit"
  # our parent (the test process) died without cleaning up: nobody else will remove BASE
  if [ "${SDBOX_RM_BASE_IF_ORPHANED:-0}" = 1 ] && [ "$(awk '{print $4}' /proc/$$/stat)" != "$PPID" ]; then
    rm -rf "$BASE"
  fi
  exit "$rc"
}

run() {
  BASE=$(realpath -e "$1") || die "no such base dir: $1"
  NAME=${2:-sdbox-$$}
  [[ $NAME =~ ^[A-Za-z0-9_.-]+$ ]] || die "bad box name: $NAME"
  preflight
  cgroup_paths
  CG=$CG2${ORIGCG%/}/$NAME
  rm -f "$BASE/state" "$BASE/sd.pid" "$BASE/go" "$BASE/exit" "$BASE/boot-failure.txt"
  echo $$ > "$BASE/run.pid"
  echo "$CG" > "$BASE/cgroup"
  set_state booting
  rm -rf "$BASE/defaults"
  write_defaults "$BASE/defaults"
  mkdir "$CG" || die "cannot create cgroup $CG"
  LPID=; WPID=
  trap on_exit EXIT
  trap 'exit 143' TERM INT HUP
  if [ "${SDBOX_LIFELINE:-0}" = 1 ]; then
    exec 3<&0 </dev/null
    ( while read -r -u 3 _; do :; done; halt_box "$BASE" ) &
    WPID=$!
  fi
  "$PY" "$HERE/launch.py" "$BASE" "$NAME" "$CG" "$CG2$ORIGCG" </dev/null >"$BASE/launch.log" 2>&1 3<&- &
  LPID=$!
  boot_wait
  wait "$LPID" || true                 # until the box is powered off (or killed)
}

start() {
  mkdir -p "$1"
  BASE=$(realpath -e "$1")
  local i state
  rm -f "$BASE/state"
  setsid bash "$HERE/boot.sh" run "$BASE" "${2:-sdbox-$$}" </dev/null >"$BASE/run.log" 2>&1 &
  for i in $(seq $(((BOOT_TIMEOUT + 10) * 20))); do
    state=$(cat "$BASE/state" 2>/dev/null || true)
    case $state in
      running) break ;;
      failed*) cat "$BASE/boot-failure.txt" >&2; exit 1 ;;
    esac
    [ -e "$BASE/exit" ] && { cat "$BASE/run.log" >&2; exit 1; }
    sleep 0.05
  done
  [ "$state" = running ] || die "boot did not finish; see $BASE/run.log"
  local pid; pid=$(cat "$BASE/sd.pid")
  echo "box running; host pid of its systemd: $pid"
  echo "drive it:  nsenter -t $pid -a systemctl status   |   nsenter -t $pid -a journalctl -b"
  echo "stop it:   bash $HERE/boot.sh stop $BASE"
}

stop() {
  BASE=$(realpath -e "$1") || die "no such base dir: $1"
  cgroup_paths
  local rpid i
  rpid=$(cat "$BASE/run.pid" 2>/dev/null || true)
  halt_box "$BASE"
  for i in $(seq 400); do                # `run` removes the cgroup and writes BASE/exit
    [ -e "$BASE/exit" ] && break
    if [ -z "$rpid" ] || [ ! -d "/proc/$rpid" ]; then break; fi
    sleep 0.025
  done
  [ -e "$BASE/exit" ] || die "run did not finish its cleanup (cgroup $(cat "$BASE/cgroup" 2>/dev/null))"
  echo "stopped (run exit status $(cat "$BASE/exit"))"
}

case ${1:-} in
  run)   [ $# -ge 2 ] || die "usage: boot.sh run BASE [NAME]";   run "$2" "${3:-}" ;;
  start) [ $# -ge 2 ] || die "usage: boot.sh start BASE [NAME]"; preflight; start "$2" "${3:-}" ;;
  stop)  [ $# -ge 2 ] || die "usage: boot.sh stop BASE";         stop "$2" ;;
  *) die "usage: boot.sh run|start|stop BASE [NAME]" ;;
esac
