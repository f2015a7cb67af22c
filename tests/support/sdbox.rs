//! A REAL systemd in throw-away namespaces, for integration tests.
//!
//! [`SystemdBox::boot`] runs `tests/support/sdbox/boot.sh`, which starts the host's
//! `/lib/systemd/systemd` as PID 1 of new pid/mount/uts/ipc/net/cgroup namespaces, with journald,
//! on an overlay root (host `/` read-only below, tmpfs on top: nothing written inside reaches the
//! host). The network namespace has only `lo`: connect to services inside with
//! [`SystemdBox::run_in_netns`] / [`NetNs`] / [`SystemdBox::start_load`].
//!
//! ```ignore
//! let Some(()) = sdbox::require_or_skip("my_test") else { return };
//! let sb = SystemdBox::builder()
//!     .host_file("/usr/local/bin/hermes-gateway", env!("CARGO_BIN_EXE_hermes-gateway"), 0o755)
//!     .unit("hermes-gateway.socket", SOCKET_UNIT)
//!     .boot()
//!     .expect("boot systemd box");
//! sb.systemctl_ok(&["start", "hermes-gateway.socket"]);
//! let body = sb.run_in_netns(|| http_get("127.0.0.1:8080"));
//! ```
//!
//! Boxes are independent (own name, cgroup, netns, temp dir), so tests using them may run in
//! parallel. Teardown (poweroff, SIGKILL fallback, cgroup removal, temp dir removal) happens on
//! drop, also when the test panics; if the test process dies without unwinding, `boot.sh` sees
//! its stdin "lifeline" pipe close and powers the box off by itself.
//!
//! Runtime helpers (`exec_ok`, `systemctl_ok`, `show`, `write_file`, ...) panic with a message
//! that includes the command, its exit status and its output: in a test that is the failure.
//! Requirements: root, overlayfs, a cgroup2 mount, systemd at /lib/systemd/systemd, util-linux
//! (unshare, nsenter, setpriv, findmnt), /usr/bin/python3 (console pty of the launcher).

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::load::{LoadClient, LoadConfig};

/// Where boot.sh, nsinit.sh and launch.py live.
const SCRIPT_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/sdbox");
/// PATH used for the scripts and for every command run inside the box.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const PYTHON: &str = "/usr/bin/python3";
const SYSTEMD: &str = "/lib/systemd/systemd";
const TOOLS: &[&str] = &[
    "bash", "unshare", "nsenter", "setpriv", "findmnt", "timeout", "setsid", "tar",
];

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Error from [`SystemdBox::boot`]; `Debug` prints the message verbatim (multi-line diagnostics
/// stay readable in `expect` panics).
pub struct BoxError {
    /// What went wrong, with diagnostics (failed units, journal and console tails).
    pub message: String,
    /// The box's name (cgroup folder name), if it got that far; it is already torn down.
    pub box_name: Option<String>,
}

impl fmt::Debug for BoxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Display for BoxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for BoxError {}

fn err(msg: impl Into<String>) -> BoxError {
    BoxError {
        message: msg.into(),
        box_name: None,
    }
}

// ------------------------------------------------------------------------------ availability

/// `Ok(())` when this machine can boot a box; otherwise says exactly what is missing. Cached.
pub fn available() -> Result<(), String> {
    static CACHE: OnceLock<Result<(), String>> = OnceLock::new();
    CACHE.get_or_init(check_available).clone()
}

/// For the first line of a test: `let Some(()) = sdbox::require_or_skip("name") else { return };`
/// Prints a `SKIP` line and returns `None` when boxes are unavailable, but panics (fails the
/// test) when `CI=true` (or `SDBOX_REQUIRED=1`): on CI a skip would hide a broken setup.
pub fn require_or_skip(test: &str) -> Option<()> {
    match available() {
        Ok(()) => Some(()),
        Err(why) => {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
                || std::env::var("SDBOX_REQUIRED").is_ok_and(|v| v == "1");
            if ci {
                panic!("{test}: a systemd box is required here (CI=true) but unavailable: {why}");
            }
            // straight to fd 2, not eprintln!: libtest captures the macros, and a skip must
            // be visible without --nocapture
            let _ = writeln!(io::stderr(), "SKIP {test}: systemd box unavailable: {why}");
            None
        }
    }
}

fn check_available() -> Result<(), String> {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        missing.push("not running as root (euid != 0)".to_string());
    }
    if !is_executable(Path::new(SYSTEMD)) {
        missing.push(format!("no {SYSTEMD}"));
    }
    for tool in TOOLS {
        if which(tool).is_none() {
            missing.push(format!("no `{tool}` in {PATH}"));
        }
    }
    if !is_executable(Path::new(PYTHON)) {
        missing.push(format!("no {PYTHON} (boot.sh's launcher)"));
    }
    match fs::read_to_string("/proc/filesystems") {
        Ok(s)
            if s.lines()
                .any(|l| l.split_whitespace().last() == Some("overlay")) => {}
        Ok(_) => missing.push(
            "no overlayfs (`overlay` not in /proc/filesystems; try `modprobe overlay`)".into(),
        ),
        Err(e) => missing.push(format!("cannot read /proc/filesystems: {e}")),
    }
    match cgroup2_mount() {
        None => missing.push("no cgroup2 mount (cgroup-v1-only hosts are not supported)".into()),
        Some(cg2) => match own_cgroup() {
            Some(own) => {
                let parent = cg2.join(own.trim_start_matches('/'));
                if !parent.is_dir() {
                    missing.push(format!("own cgroup folder {} is missing", parent.display()));
                }
            }
            None => missing.push("no cgroup v2 entry in /proc/self/cgroup".into()),
        },
    }
    if missing.is_empty() {
        // the real thing: can we make the namespaces at all (seccomp, nested containers, ...)?
        let probe = Command::new("unshare")
            .args([
                "--pid", "--mount", "--uts", "--ipc", "--net", "--cgroup", "--fork",
            ])
            .args(["--propagation", "private", "/bin/true"])
            .env_clear()
            .env("PATH", PATH)
            .stdin(Stdio::null())
            .output();
        match probe {
            Ok(o) if o.status.success() => {}
            Ok(o) => missing.push(format!(
                "cannot create pid/mount/uts/ipc/net/cgroup namespaces: unshare {}: {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => missing.push(format!("cannot run unshare: {e}")),
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing.join("; "))
    }
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn which(tool: &str) -> Option<PathBuf> {
    PATH.split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| is_executable(p))
}

/// Mount point of the cgroup2 hierarchy (`/sys/fs/cgroup/unified` on hybrid hosts).
fn cgroup2_mount() -> Option<PathBuf> {
    let mi = fs::read_to_string("/proc/self/mountinfo").ok()?;
    mi.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        if post.split_whitespace().next() != Some("cgroup2") {
            return None;
        }
        pre.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// Our own cgroup v2 path ("0::" line of /proc/self/cgroup), e.g. "/".
fn own_cgroup() -> Option<String> {
    let s = fs::read_to_string("/proc/self/cgroup").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

// ------------------------------------------------------------------------------ payload + builder

/// Contents of a file placed into the box.
#[derive(Clone, Debug)]
pub enum Content {
    /// These bytes.
    Bytes(Vec<u8>),
    /// A copy of this host file (e.g. `env!("CARGO_BIN_EXE_hermes-gateway")`).
    HostFile(PathBuf),
}

impl Content {
    /// A copy of the host file at `path`.
    pub fn host_file(path: impl Into<PathBuf>) -> Self {
        Content::HostFile(path.into())
    }
}

impl From<&str> for Content {
    fn from(s: &str) -> Self {
        Content::Bytes(s.as_bytes().to_vec())
    }
}

impl From<String> for Content {
    fn from(s: String) -> Self {
        Content::Bytes(s.into_bytes())
    }
}

impl From<&[u8]> for Content {
    fn from(b: &[u8]) -> Self {
        Content::Bytes(b.to_vec())
    }
}

impl<const N: usize> From<&[u8; N]> for Content {
    fn from(b: &[u8; N]) -> Self {
        Content::Bytes(b.to_vec())
    }
}

impl From<Vec<u8>> for Content {
    fn from(b: Vec<u8>) -> Self {
        Content::Bytes(b)
    }
}

/// Configures a box before boot; [`SystemdBox::builder`].
#[derive(Clone, Debug)]
pub struct Builder {
    files: Vec<(String, Content, u32)>,
    wants: Vec<String>,
    masks: Vec<String>,
    boot_timeout: Duration,
    stop_timeout: Duration,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            files: Vec::new(),
            wants: Vec::new(),
            masks: Vec::new(),
            boot_timeout: Duration::from_secs(60),
            stop_timeout: Duration::from_secs(5),
        }
    }
}

impl Builder {
    /// Put a file at absolute `path` inside the box (parents are created, mode 0755).
    pub fn file(mut self, path: &str, contents: impl Into<Content>, mode: u32) -> Self {
        self.files.push((path.to_string(), contents.into(), mode));
        self
    }

    /// Put a copy of host file `host` at `path` inside the box.
    pub fn host_file(self, path: &str, host: impl Into<PathBuf>, mode: u32) -> Self {
        self.file(path, Content::HostFile(host.into()), mode)
    }

    /// A unit file at /etc/systemd/system/`name` (mode 0644).
    pub fn unit(self, name: &str, text: &str) -> Self {
        self.file(&format!("/etc/systemd/system/{name}"), text, 0o644)
    }

    /// Start `unit` during boot (a `Wants=` of the boot target); boot waits for it.
    pub fn boot_wants(mut self, unit: &str) -> Self {
        self.wants.push(unit.to_string());
        self
    }

    /// Mask `unit` (symlink to /dev/null in /etc/systemd/system).
    pub fn mask(mut self, unit: &str) -> Self {
        self.masks.push(unit.to_string());
        self
    }

    /// Give up on boot after this long (default 60 s).
    pub fn boot_timeout(mut self, t: Duration) -> Self {
        self.boot_timeout = t;
        self
    }

    /// At teardown, SIGKILL the box when poweroff takes longer than this (default 5 s).
    pub fn stop_timeout(mut self, t: Duration) -> Self {
        self.stop_timeout = t;
        self
    }

    /// Boot the box and wait until `systemctl is-system-running --wait` says `running`.
    pub fn boot(self) -> Result<SystemdBox, BoxError> {
        SystemdBox::boot_with(self)
    }
}

/// Relative path inside the payload dir for an absolute container path; rejects `..` etc.
fn payload_rel(path: &str) -> Result<PathBuf, BoxError> {
    let p = Path::new(path);
    let mut rel = PathBuf::new();
    for (i, c) in p.components().enumerate() {
        match c {
            Component::RootDir if i == 0 => {}
            Component::Normal(n) => rel.push(n),
            _ => {
                return Err(err(format!(
                    "payload path must be absolute and plain: {path:?}"
                )));
            }
        }
    }
    if !p.is_absolute() || rel.as_os_str().is_empty() {
        return Err(err(format!(
            "payload path must be absolute and plain: {path:?}"
        )));
    }
    Ok(rel)
}

fn stage_file(payload: &Path, path: &str, content: &Content, mode: u32) -> Result<(), BoxError> {
    let dest = payload.join(payload_rel(path)?);
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent)
            .map_err(|e| err(format!("payload: mkdir {}: {e}", parent.display())))?;
    }
    match content {
        Content::Bytes(b) => fs::write(&dest, b)
            .map_err(|e| err(format!("payload: write {}: {e}", dest.display())))?,
        Content::HostFile(src) => {
            fs::copy(src, &dest).map_err(|e| {
                err(format!(
                    "payload: copy host file {} for {path}: {e}",
                    src.display()
                ))
            })?;
        }
    }
    fs::set_permissions(&dest, fs::Permissions::from_mode(mode))
        .map_err(|e| err(format!("payload: chmod {}: {e}", dest.display())))
}

// ------------------------------------------------------------------------------ the box

/// A running systemd in throw-away namespaces. Dropping it tears everything down.
pub struct SystemdBox {
    name: String,
    base: Option<tempfile::TempDir>,
    base_path: PathBuf,
    child: Option<Child>,
    lifeline: Option<ChildStdin>,
    pid: i32,
    cgroup: PathBuf,
    cgroup2: PathBuf,
    boot_time: Duration,
    stop_timeout: Duration,
    nsenter: PathBuf,
    torn_down: bool,
}

impl fmt::Debug for SystemdBox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SystemdBox")
            .field("name", &self.name)
            .field("pid", &self.pid)
            .field("cgroup", &self.cgroup)
            .finish()
    }
}

impl SystemdBox {
    /// Same as [`available`].
    pub fn available() -> Result<(), String> {
        available()
    }

    /// A [`Builder`] for payload files, boot-time units, masks and timeouts.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// Boot with these `(container path, contents, mode)` files copied in first, e.g.
    /// `("/usr/local/bin/hermes-gateway", Content::host_file(env!("CARGO_BIN_EXE_hermes-gateway")), 0o755)`.
    pub fn boot(payload: &[(&str, Content, u32)]) -> Result<SystemdBox, BoxError> {
        let mut b = Builder::default();
        for (path, content, mode) in payload {
            b = b.file(path, content.clone(), *mode);
        }
        b.boot()
    }

    fn boot_with(cfg: Builder) -> Result<SystemdBox, BoxError> {
        let t0 = Instant::now();
        available().map_err(|why| err(format!("systemd box unavailable: {why}")))?;
        let nsenter = which("nsenter").ok_or_else(|| err("no nsenter"))?;
        let cgroup2 = cgroup2_mount().ok_or_else(|| err("no cgroup2 mount"))?;
        reap_stale_cgroups(&cgroup2);

        let name = format!(
            "sdbox-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let base = tempfile::Builder::new()
            .prefix(&format!("{name}."))
            .tempdir()
            .map_err(|e| err(format!("cannot create temp dir: {e}")))?;
        let base_path = base.path().to_path_buf();

        let payload = base_path.join("payload");
        for (path, content, mode) in &cfg.files {
            stage_file(&payload, path, content, *mode)?;
        }
        if !cfg.wants.is_empty() {
            let text = format!("[Unit]\nWants={}\n", cfg.wants.join(" "));
            stage_file(
                &payload,
                "/etc/systemd/system/sdbox.target.d/50-wants.conf",
                &text.into(),
                0o644,
            )?;
        }
        for unit in &cfg.masks {
            let dir = payload.join("etc/systemd/system");
            fs::create_dir_all(&dir).map_err(|e| err(format!("payload: mkdir: {e}")))?;
            symlink("/dev/null", dir.join(unit))
                .map_err(|e| err(format!("payload: mask {unit}: {e}")))?;
        }

        let log = fs::File::create(base_path.join("run.log"))
            .map_err(|e| err(format!("cannot create run.log: {e}")))?;
        let log2 = log
            .try_clone()
            .map_err(|e| err(format!("cannot dup run.log: {e}")))?;
        let mut child = Command::new("/bin/bash")
            .arg(format!("{SCRIPT_DIR}/boot.sh"))
            .arg("run")
            .arg(&base_path)
            .arg(&name)
            .env_clear()
            .env("PATH", PATH)
            .env("LANG", "C.UTF-8")
            .env("SDBOX_LIFELINE", "1")
            .env("SDBOX_RM_BASE_IF_ORPHANED", "1")
            .env(
                "SDBOX_BOOT_TIMEOUT",
                cfg.boot_timeout.as_secs().max(1).to_string(),
            )
            .env(
                "SDBOX_STOP_TIMEOUT",
                cfg.stop_timeout.as_secs().max(1).to_string(),
            )
            .stdin(Stdio::piped())
            .stdout(log)
            .stderr(log2)
            // own process group: a Ctrl-C to `cargo test` must not kill boot.sh before it cleans up
            .process_group(0)
            .spawn()
            .map_err(|e| err(format!("cannot start boot.sh: {e}")))?;
        let lifeline = child.stdin.take();
        // from here on, any early return tears down through Drop
        let mut sb = SystemdBox {
            name,
            base: Some(base),
            base_path,
            child: Some(child),
            lifeline,
            pid: 0,
            cgroup: PathBuf::new(),
            cgroup2,
            boot_time: Duration::ZERO,
            stop_timeout: cfg.stop_timeout,
            nsenter,
            torn_down: false,
        };
        if let Err(mut e) = sb.wait_booted(cfg.boot_timeout + Duration::from_secs(10)) {
            e.box_name = Some(sb.name.clone());
            drop(sb); // tear down before reporting
            return Err(e);
        }
        sb.boot_time = t0.elapsed();
        Ok(sb)
    }

    fn wait_booted(&mut self, timeout: Duration) -> Result<(), BoxError> {
        let deadline = Instant::now() + timeout;
        loop {
            let state = fs::read_to_string(self.base_path.join("state")).unwrap_or_default();
            let state = state.trim();
            if state == "running" {
                break;
            }
            let exited = match self.child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => Some(status.to_string()),
                Some(Err(e)) => Some(format!("cannot wait for boot.sh: {e}")),
                _ => None,
            };
            if state.starts_with("failed") || exited.is_some() || Instant::now() > deadline {
                let why = if let Some(s) = exited {
                    format!("boot.sh exited early ({s})")
                } else if state.is_empty() || state == "booting" {
                    format!("boot did not finish within {timeout:?}")
                } else {
                    state.trim_start_matches("failed: ").to_string()
                };
                // boot-failure.txt (failed units, jobs, journal, console) when boot.sh got that
                // far; otherwise whatever boot.sh printed
                let details = fs::read_to_string(self.base_path.join("boot-failure.txt"))
                    .ok()
                    .filter(|d| !d.trim().is_empty())
                    .unwrap_or_else(|| {
                        let log = fs::read_to_string(self.base_path.join("run.log"));
                        format!("== boot.sh output\n{}", log.unwrap_or_default())
                    });
                return Err(err(format!(
                    "systemd box {} failed to boot: {why}\n{details}",
                    self.name
                )));
            }
            thread::sleep(Duration::from_millis(5));
        }
        let pid = fs::read_to_string(self.base_path.join("sd.pid")).unwrap_or_default();
        self.pid = pid
            .trim()
            .parse()
            .map_err(|_| err(format!("bad sd.pid {pid:?}")))?;
        let cg = fs::read_to_string(self.base_path.join("cgroup")).unwrap_or_default();
        self.cgroup = PathBuf::from(cg.trim());
        Ok(())
    }

    /// Host PID of the box's systemd (PID 1 inside).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Unique name (`sdbox-<test pid>-<n>`): cgroup folder name and temp dir prefix.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The box's cgroup folder on the host (its cgroup namespace root).
    pub fn cgroup_dir(&self) -> &Path {
        &self.cgroup
    }

    /// The box's temp dir on the host (payload, console.log, run.log, state files).
    pub fn base_dir(&self) -> &Path {
        &self.base_path
    }

    /// Wall time from `boot()` to `running`.
    pub fn boot_duration(&self) -> Duration {
        self.boot_time
    }

    /// A `Command` running `argv` inside the box (`nsenter -t PID -a`), with a clean environment
    /// (PATH, LANG=C.UTF-8, no pager/colors) and stdin from /dev/null; customise and run it.
    pub fn command(&self, argv: &[&str]) -> Command {
        let mut c = Command::new(&self.nsenter);
        c.arg("-t")
            .arg(self.pid.to_string())
            .arg("-a")
            .arg("--")
            .args(argv)
            .env_clear()
            .env("PATH", PATH)
            .env("LANG", "C.UTF-8")
            .env("SYSTEMD_PAGER", "")
            .env("SYSTEMD_COLORS", "0")
            .env("TERM", "dumb")
            .stdin(Stdio::null());
        c
    }

    /// Run `argv` inside the box and collect its output (panics only if nsenter cannot start).
    pub fn exec(&self, argv: &[&str]) -> Output {
        self.command(argv)
            .output()
            .unwrap_or_else(|e| panic!("{}: cannot run nsenter for {argv:?}: {e}", self.name))
    }

    /// Run `argv` inside; panic (with status, stdout, stderr) unless it succeeds; return stdout.
    pub fn exec_ok(&self, argv: &[&str]) -> String {
        let out = self.exec(argv);
        if !out.status.success() {
            panic!("{}", describe(&self.name, argv, &out));
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run a `/bin/sh -c` script inside.
    pub fn sh(&self, script: &str) -> Output {
        self.exec(&["/bin/sh", "-c", script])
    }

    /// Run a `/bin/sh -c` script inside; panic unless it succeeds; return stdout.
    pub fn sh_ok(&self, script: &str) -> String {
        self.exec_ok(&["/bin/sh", "-c", script])
    }

    /// `systemctl ARGS...` inside.
    pub fn systemctl(&self, args: &[&str]) -> Output {
        let mut argv = vec!["systemctl"];
        argv.extend_from_slice(args);
        self.exec(&argv)
    }

    /// `systemctl ARGS...` inside; panic unless it succeeds; return stdout.
    pub fn systemctl_ok(&self, args: &[&str]) -> String {
        let mut argv = vec!["systemctl"];
        argv.extend_from_slice(args);
        self.exec_ok(&argv)
    }

    /// `systemctl show -P PROP UNIT` (trailing newline removed).
    pub fn show(&self, unit: &str, prop: &str) -> String {
        let mut v = self.systemctl_ok(&["show", "-P", prop, unit]);
        while v.ends_with('\n') {
            v.pop();
        }
        v
    }

    /// Poll until `show(unit, prop) == want`; panics with the last value after `timeout`.
    pub fn wait_prop(&self, unit: &str, prop: &str, want: &str, timeout: Duration) {
        let mut last = String::new();
        let ok = poll(timeout, || {
            last = self.show(unit, prop);
            (last == want).then_some(())
        });
        if ok.is_none() {
            panic!(
                "{}: {unit} {prop} is {last:?}, not {want:?} after {timeout:?}\n{}",
                self.name,
                self.unit_diagnostics(unit)
            );
        }
    }

    /// `systemctl daemon-reload`.
    pub fn daemon_reload(&self) {
        self.systemctl_ok(&["daemon-reload"]);
    }

    /// `journalctl --no-pager -o json --all ARGS...`, one JSON object per entry.
    pub fn journal(&self, args: &[&str]) -> Vec<serde_json::Value> {
        let mut argv = vec!["journalctl", "--no-pager", "-o", "json", "--all"];
        argv.extend_from_slice(args);
        let out = self.exec_ok(&argv);
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("{}: bad journal JSON ({e}): {l}", self.name))
            })
            .collect()
    }

    /// All journal entries of `unit` (`journalctl -u UNIT -o json`), oldest first.
    pub fn journal_json(&self, unit: &str) -> Vec<serde_json::Value> {
        self.journal(&["-u", unit])
    }

    /// The `MESSAGE` fields of `unit`'s journal entries.
    pub fn journal_messages(&self, unit: &str) -> Vec<String> {
        self.journal_json(unit).iter().map(message_of).collect()
    }

    /// Poll `unit`'s journal until a `MESSAGE` contains `needle`; returns that entry.
    pub fn wait_journal(&self, unit: &str, needle: &str, timeout: Duration) -> serde_json::Value {
        poll(timeout, || {
            self.journal_json(unit)
                .into_iter()
                .find(|e| message_of(e).contains(needle))
        })
        .unwrap_or_else(|| {
            panic!(
                "{}: no journal line of {unit} contains {needle:?} after {timeout:?}; got:\n{}",
                self.name,
                self.journal_messages(unit).join("\n")
            )
        })
    }

    /// Write `contents` to `path` inside the box at runtime: parents created, file written to a
    /// temp name, chmod `mode`, then renamed over `path` (atomic; safe for a running binary).
    pub fn write_file(&self, path: &str, contents: impl AsRef<[u8]>, mode: u32) {
        const SCRIPT: &str = r#"set -e; mkdir -p -- "$(dirname -- "$1")"; t="$1.sdbox-tmp.$$"
cat > "$t"; chmod "$2" "$t"; mv -f -- "$t" "$1""#;
        let mode = format!("{mode:o}");
        let argv = ["/bin/sh", "-c", SCRIPT, "sh", path, mode.as_str()];
        let mut child = self
            .command(&argv)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: cannot run nsenter to write {path}: {e}", self.name));
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let contents = contents.as_ref();
        let out = thread::scope(|s| {
            let writer = s.spawn(move || stdin.write_all(contents));
            let out = child.wait_with_output();
            (writer.join(), out)
        });
        let out = match out {
            (_, Err(e)) => panic!("{}: waiting for writer of {path}: {e}", self.name),
            (Err(_), _) => panic!("{}: writer thread for {path} panicked", self.name),
            (Ok(Err(e)), Ok(out)) => panic!(
                "{}: writing {path}: {e}\n{}",
                self.name,
                describe(&self.name, &argv, &out)
            ),
            (Ok(Ok(())), Ok(out)) => out,
        };
        if !out.status.success() {
            panic!("{}", describe(&self.name, &argv, &out));
        }
    }

    /// Copy host file `host` to `path` inside the box at runtime (like [`Self::write_file`]).
    pub fn copy_in(&self, host: impl AsRef<Path>, path: &str, mode: u32) {
        let host = host.as_ref();
        let bytes = fs::read(host).unwrap_or_else(|e| {
            panic!(
                "{}: cannot read host file {}: {e}",
                self.name,
                host.display()
            )
        });
        self.write_file(path, bytes, mode);
    }

    /// Contents of `path` inside the box.
    pub fn read_file(&self, path: &str) -> Vec<u8> {
        let argv = ["cat", "--", path];
        let out = self.exec(&argv);
        if !out.status.success() {
            panic!("{}", describe(&self.name, &argv, &out));
        }
        out.stdout
    }

    /// A handle on the box's network namespace (only `lo`; services listen there).
    pub fn netns(&self) -> NetNs {
        NetNs::of_pid(self.pid)
            .unwrap_or_else(|e| panic!("{}: cannot open netns of pid {}: {e}", self.name, self.pid))
    }

    /// Run `f` on a new thread that lives in the box's network namespace and return its result
    /// (panics in `f` propagate). `f` may build its own tokio current_thread runtime; sockets
    /// must be created on that thread (not via `spawn_blocking` / a multi-thread runtime).
    pub fn run_in_netns<T, F>(&self, f: F) -> T
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        self.netns().run(f)
    }

    /// Start a [`LoadClient`] on its own thread inside the box's network namespace.
    pub fn start_load(&self, cfg: LoadConfig) -> LoadClient {
        let ns = self.netns();
        LoadClient::start_with(cfg, move || ns.enter())
            .unwrap_or_else(|e| panic!("{}: cannot start load client in netns: {e}", self.name))
    }

    /// Everything the box's console printed (systemd's boot/shutdown status lines).
    pub fn console_log(&self) -> String {
        fs::read_to_string(self.base_path.join("console.log"))
            .unwrap_or_default()
            .replace('\r', "")
    }

    /// Failed units, jobs and the last 100 journal lines: print it when a test fails.
    pub fn diagnostics(&self) -> String {
        let mut s = String::new();
        for (title, argv) in [
            (
                "systemctl --failed",
                &["systemctl", "--failed", "--no-pager", "--full"][..],
            ),
            (
                "systemctl list-jobs",
                &["systemctl", "list-jobs", "--no-pager", "--full"][..],
            ),
            (
                "journal (last 100)",
                &["journalctl", "-b", "--no-pager", "-n", "100"][..],
            ),
        ] {
            let out = self.exec(argv);
            s += &format!(
                "== {title}\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        s
    }

    fn unit_diagnostics(&self, unit: &str) -> String {
        let status = self.exec(&[
            "systemctl",
            "status",
            "--no-pager",
            "--full",
            "-n",
            "30",
            unit,
        ]);
        format!(
            "== systemctl status {unit}\n{}{}",
            String::from_utf8_lossy(&status.stdout),
            String::from_utf8_lossy(&status.stderr)
        )
    }

    /// Tear down now and report how long it took; `Err` lists whatever could not be cleaned.
    pub fn shutdown(mut self) -> Result<Duration, String> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<Duration, String> {
        if self.torn_down {
            return Ok(Duration::ZERO);
        }
        self.torn_down = true;
        let t0 = Instant::now();
        let mut problems = Vec::new();
        // closing the lifeline makes boot.sh power the box off (SIGKILL after stop_timeout),
        // wait for it and remove its cgroup folders
        drop(self.lifeline.take());
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + self.stop_timeout + Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        if self.pid != 0 && !status.success() {
                            problems.push(format!("boot.sh exited with {status}"));
                        }
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        thread::sleep(Duration::from_millis(5))
                    }
                    Ok(None) => {
                        problems.push("boot.sh did not finish its teardown in time; killed".into());
                        self.kill_box();
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Err(e) => {
                        problems.push(format!("cannot wait for boot.sh: {e}"));
                        break;
                    }
                }
            }
        }
        // belt and braces: nothing of the box may survive
        if self.box_pid_alive() {
            problems.push(format!("box pid {} still alive; SIGKILL", self.pid));
            self.kill_box();
        }
        if !self.cgroup.as_os_str().is_empty() && self.cgroup.exists() {
            let deadline = Instant::now() + Duration::from_secs(3);
            while self.cgroup.exists() && Instant::now() < deadline {
                self.kill_box();
                rmdir_tree(&self.cgroup);
                thread::sleep(Duration::from_millis(10));
            }
            if self.cgroup.exists() {
                problems.push(format!("cannot remove cgroup {}", self.cgroup.display()));
            }
        }
        if !problems.is_empty() {
            let log = fs::read_to_string(self.base_path.join("run.log")).unwrap_or_default();
            problems.push(format!("boot.sh output:\n{log}"));
        }
        if let Some(base) = self.base.take()
            && let Err(e) = base.close()
        {
            problems.push(format!("cannot remove {}: {e}", self.base_path.display()));
        }
        if problems.is_empty() {
            Ok(t0.elapsed())
        } else {
            Err(format!("{} teardown: {}", self.name, problems.join("\n")))
        }
    }

    /// Is `self.pid` still the box's PID 1 (not a recycled PID)?
    fn box_pid_alive(&self) -> bool {
        if self.pid <= 0 || self.cgroup.as_os_str().is_empty() {
            return false;
        }
        let Ok(rel) = self.cgroup.strip_prefix(&self.cgroup2) else {
            return false;
        };
        let rel = format!("/{}", rel.display());
        fs::read_to_string(format!("/proc/{}/cgroup", self.pid)).is_ok_and(|s| {
            s.lines()
                .filter_map(|l| l.strip_prefix("0::"))
                .any(|p| p == rel || p.starts_with(&format!("{rel}/")))
        })
    }

    fn kill_box(&self) {
        if !self.cgroup.as_os_str().is_empty() {
            let _ = fs::write(self.cgroup.join("cgroup.kill"), "1");
        }
        if self.box_pid_alive() {
            // SAFETY: plain kill(2) on the PID we just verified is the box's PID 1 (killing a
            // pid-namespace init kills the whole namespace).
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
    }
}

impl Drop for SystemdBox {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("sdbox: {e}");
        }
    }
}

fn message_of(e: &serde_json::Value) -> String {
    match &e["MESSAGE"] {
        serde_json::Value::String(s) => s.clone(),
        // non-UTF-8 messages come as an array of bytes
        serde_json::Value::Array(a) => {
            let b: Vec<u8> = a
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u8)
                .collect();
            String::from_utf8_lossy(&b).into_owned()
        }
        _ => String::new(),
    }
}

fn describe(name: &str, argv: &[&str], out: &Output) -> String {
    format!(
        "{name}: {argv:?} failed: {}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// rmdir a cgroup folder and all its sub-folders, deepest first (errors ignored).
fn rmdir_tree(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_tree(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// Remove empty cgroup folders left by boxes of test processes that no longer exist (a test
/// binary killed together with its boot.sh). Only rmdir: a folder with processes stays.
fn reap_stale_cgroups(cgroup2: &Path) {
    let Some(own) = own_cgroup() else { return };
    let parent = cgroup2.join(own.trim_start_matches('/'));
    let Ok(rd) = fs::read_dir(&parent) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(owner) = name
            .strip_prefix("sdbox-")
            .and_then(|r| r.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if owner == std::process::id() || Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        rmdir_tree(&e.path());
        if e.path().exists() {
            eprintln!(
                "sdbox: stale cgroup {} (owner pid {owner} is gone) still has processes",
                e.path().display()
            );
        }
    }
}

// ------------------------------------------------------------------------------ netns

/// A network namespace handle (an open `/proc/PID/ns/net`).
#[derive(Debug)]
pub struct NetNs {
    fd: OwnedFd,
}

impl NetNs {
    /// The network namespace of host process `pid`.
    pub fn of_pid(pid: i32) -> io::Result<NetNs> {
        let f = fs::File::open(format!("/proc/{pid}/ns/net"))?;
        Ok(NetNs { fd: f.into() })
    }

    /// Another handle on the same namespace.
    pub fn try_clone(&self) -> io::Result<NetNs> {
        Ok(NetNs {
            fd: self.fd.try_clone()?,
        })
    }

    /// Move the CALLING THREAD (only) into this network namespace. Use it on a thread you
    /// created for that purpose: sockets it creates afterwards live in the namespace.
    pub fn enter(&self) -> io::Result<()> {
        // nix 0.32 is built without its "sched" feature here, so call setns(2) directly.
        // SAFETY: setns only reads the fd, which `self` keeps open for the duration of the call;
        // with CLONE_NEWNET it changes the network namespace of the calling thread only.
        let rc = unsafe { libc::setns(self.fd.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Spawn a thread that enters this namespace and then runs `f`.
    pub fn spawn<T, F>(&self, f: F) -> JoinHandle<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let ns = self.try_clone().expect("dup netns fd");
        thread::Builder::new()
            .name("sdbox-netns".into())
            .spawn(move || {
                ns.enter()
                    .unwrap_or_else(|e| panic!("setns(CLONE_NEWNET) failed: {e}"));
                drop(ns);
                f()
            })
            .expect("spawn netns thread")
    }

    /// Run `f` on a fresh thread inside this namespace; wait for and return its result.
    pub fn run<T, F>(&self, f: F) -> T
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        match self.spawn(f).join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

// ------------------------------------------------------------------------------ polling

/// Call `probe` every 20 ms until it returns `Some` (returned) or `timeout` passes (`None`).
/// `probe` runs at least once, and once more at the deadline.
pub fn poll<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20).min(deadline - now));
    }
}

/// Like [`poll`], but panics with "timed out after .. waiting for `what`".
pub fn wait_for<T>(what: &str, timeout: Duration, probe: impl FnMut() -> Option<T>) -> T {
    poll(timeout, probe).unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// Like [`wait_for`] with a boolean condition.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    wait_for(what, timeout, || cond().then_some(()))
}
