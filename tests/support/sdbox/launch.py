# launch.py BASE NAME CGROUP ORIGCGROUP -- started (and waited for) by boot.sh.
# Starts `unshare ... nsinit.sh` with a pty as console, puts it into the box's cgroup before it
# unshares (so the new cgroup namespace is rooted there), then moves the `unshare` parent back out
# so the box's systemd owns its whole cgroup subtree. Copies the console to BASE/console.log and
# exits with unshare's status once the box's PID 1 is gone.
import os, pty, subprocess, sys, time

base, name, cg, origcg = sys.argv[1:5]
here = os.path.dirname(os.path.abspath(__file__))
m, s = pty.openpty()


def child():
    with open(cg + "/cgroup.procs", "w") as f:
        f.write(str(os.getpid()))


p = subprocess.Popen(["unshare", "--pid", "--mount", "--uts", "--ipc", "--net", "--cgroup", "--fork",
                      "--propagation", "private", "/bin/bash", here + "/nsinit.sh", base, name],
                     stdin=s, stdout=s, stderr=s, start_new_session=True, preexec_fn=child)
os.close(s)
kids = []
for _ in range(500):
    try:
        kids = open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()
    except FileNotFoundError:
        break
    if kids:
        break
    time.sleep(0.01)
with open(origcg + "/cgroup.procs", "w") as f:
    f.write(str(p.pid))
with open(base + "/sd.pid.tmp", "w") as f:
    f.write(kids[0] + "\n" if kids else "")
os.rename(base + "/sd.pid.tmp", base + "/sd.pid")
open(base + "/go", "w").close()
with open(base + "/console.log", "ab", buffering=0) as log:
    while True:
        try:
            b = os.read(m, 65536)
        except OSError:
            break
        if not b:
            break
        log.write(b)
sys.exit(p.wait())
