//! `RELOADING=1` sent from inside the SIGHUP handler.
//!
//! Under systemd 252 (`Type=notify`, `ExecReload=kill -HUP $MAINPID`) `systemctl reload`
//! waits for READY=1 only if RELOADING=1 reached systemd before it saw `kill` exit.
//! systemd reads notifications before SIGCHLD within one loop iteration, so the datagram
//! must already be queued when `kill` returns: it is sent in the signal handler itself,
//! not a moment later from the async runtime. `send(2)` and `clock_gettime(2)` are
//! async-signal-safe; the handler allocates nothing.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{SockFlag, SockType, UnixAddr, connect, socket};

const HEAD: &[u8] = b"RELOADING=1\nSTATUS=reloading configuration\nMONOTONIC_USEC=";

/// Installs the handler action (beside the runtime's own SIGHUP handling, which does the
/// reload). Returns false where there is no notify socket or it could not be set up.
pub fn install(target: Option<&UnixAddr>) -> bool {
    let Some(target) = target else { return false };
    let Ok(fd) = socket(
        nix::sys::socket::AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    ) else {
        return false;
    };
    if connect(fd.as_raw_fd(), target).is_err() {
        return false;
    }
    // The descriptor lives as long as the process: the handler may run at any time.
    let fd: &'static OwnedFd = Box::leak(Box::new(fd));
    let raw = fd.as_raw_fd();
    let action = move || {
        let mut buf = [0u8; 96];
        let mut n = HEAD.len();
        buf[..n].copy_from_slice(HEAD);
        n += write_decimal(&mut buf[n..], monotonic_usec());
        if n < buf.len() {
            buf[n] = b'\n';
            n += 1;
        }
        // SAFETY: `buf[..n]` is initialized stack memory; `raw` stays open (leaked).
        unsafe {
            libc::send(
                raw,
                buf.as_ptr().cast(),
                n,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            );
        }
    };
    // SAFETY: the action only calls async-signal-safe functions (clock_gettime, send) on
    // stack memory and a descriptor that is never closed; it takes no locks and does not
    // allocate. signal-hook-registry chains it with tokio's own SIGHUP action.
    let r = unsafe { signal_hook_registry::register(libc::SIGHUP, action) };
    r.is_ok()
}

fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// Writes `v` in decimal at the start of `out`; returns the number of bytes written.
fn write_decimal(out: &mut [u8], mut v: u64) -> usize {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let len = (digits.len() - i).min(out.len());
    out[..len].copy_from_slice(&digits[i..i + len]);
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decimal_of(v: u64) -> Vec<u8> {
        let mut b = [0u8; 24];
        let n = write_decimal(&mut b, v);
        b[..n].to_vec()
    }

    #[test]
    fn decimal() {
        assert_eq!(decimal_of(0), b"0");
        assert_eq!(decimal_of(1_234_567_890_123), b"1234567890123");
        assert_eq!(decimal_of(u64::MAX), b"18446744073709551615");
    }
}
