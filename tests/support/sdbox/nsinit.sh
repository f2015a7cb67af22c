#!/bin/bash
# nsinit.sh BASE NAME -- runs as PID 1 of fresh pid/mnt/uts/ipc/net/cgroup namespaces (started by
# launch.py via `unshare`). Builds an ephemeral root (overlay: host "/" read-only lower layer,
# tmpfs upper layer), copies BASE/defaults/ then BASE/payload/ onto it, and execs systemd.
# Nothing mounted here is visible on the host (private mount namespace, private propagation).
set -euo pipefail
B=$1; NAME=$2; R=$B/root
for _ in $(seq 200); do [ -e "$B/go" ] && break; sleep 0.05; done   # launcher moved `unshare` out of our cgroup
[ -e "$B/go" ] || { echo "nsinit: launcher never said go" >&2; exit 1; }
mkdir -p "$B/rw" "$R"
mount -t tmpfs -o mode=0755,size=4g "$NAME-rw" "$B/rw"
mkdir -p "$B/rw/upper" "$B/rw/work"
mount -t overlay "$NAME-root" -o "lowerdir=/,upperdir=$B/rw/upper,workdir=$B/rw/work" "$R"
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
for p in sys sysrq-trigger; do   # read-only kernel knobs, like systemd-nspawn
  [ -e "$R/proc/$p" ] && mount --bind "$R/proc/$p" "$R/proc/$p" && mount -o remount,bind,ro "$R/proc/$p"
done
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
mount -t cgroup2 -o nosuid,nodev,noexec,nsdelegate cgroup2 "$R/sys/fs/cgroup"   # root = our cgroupns
mount -t tmpfs -o mode=0755,nosuid,size=4m "$NAME-dev" "$R/dev"
for d in null zero full random urandom tty; do touch "$R/dev/$d"; mount --bind "/dev/$d" "$R/dev/$d"; done
mkdir -p "$R/dev/pts" "$R/dev/shm" "$R/dev/mqueue"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts "$R/dev/pts"
mount -t tmpfs -o mode=1777,nosuid,nodev "$NAME-shm" "$R/dev/shm"
mount -t mqueue mqueue "$R/dev/mqueue" || true
ln -s pts/ptmx "$R/dev/ptmx"; ln -s /proc/self/fd "$R/dev/fd"
for i in 0:stdin 1:stdout 2:stderr; do ln -s "/proc/self/fd/${i%%:*}" "$R/dev/${i#*:}"; done
touch "$R/dev/console"          # console = the launcher's pty (copied to BASE/console.log)
if t=$(tty 2>/dev/null); then mount --bind "$t" "$R/dev/console"; else mount --bind /dev/null "$R/dev/console"; fi
mount -t tmpfs -o mode=0755,nosuid,nodev,size=512m "$NAME-run" "$R/run"
mount -t tmpfs -o mode=1777,nosuid,nodev,size=2g "$NAME-tmp" "$R/tmp"
mkdir -p "$R/run/lock"
# boot target, journald config, masks; then the test's files (may override the defaults). tar, not
# `cp -a`: keeps merged-usr symlinks (/lib -> usr/lib) and the modes of existing dirs (/tmp 1777)
for d in defaults payload; do
  [ -d "$B/$d" ] || continue
  tar -C "$B/$d" -cf - . | tar -C "$R" -xf - --keep-directory-symlink --no-overwrite-dir
done
rm -f "$R/usr/sbin/policy-rc.d"   # image ships one exiting 101: would block starts in `dpkg -i` (overlay: host copy stays)
tr -d - < /proc/sys/kernel/random/uuid > "$R/etc/machine-id"   # own journal dir / boot identity
cd "$R"; mkdir -p .oldroot; pivot_root . .oldroot; umount -l /.oldroot; rmdir /.oldroot
export container=sdbox
# drop caps a test container must not use on the shared kernel (as systemd-nspawn does)
exec setpriv --bounding-set -sys_module,-sys_time,-sys_rawio,-syslog,-wake_alarm,-block_suspend,-sys_pacct,-mac_admin,-mac_override \
     /lib/systemd/systemd --unit="${SDBOX_UNIT:-sdbox.target}"
