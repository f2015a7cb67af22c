//! launchd socket activation (`launch_activate_socket(3)`), macOS only: the descriptors
//! launchd holds for a name, and nothing else. What they listen on and what becomes of
//! them is `listeners`' business; this module imports nothing of it.
//!
//! The plist's `Sockets` dictionary names the sockets; launchd hands every descriptor of a
//! name at once (IPv4 and IPv6 apart), and each of them is served.

use std::io;
use std::os::fd::OwnedFd;

/// The descriptors launchd holds for `name`; none when the process is not managed by
/// launchd (`ESRCH`) or the plist declares no socket of that name (`ENOENT`).
#[cfg(target_os = "macos")]
pub fn activate(name: &str) -> io::Result<Vec<OwnedFd>> {
    use std::ffi::CString;
    use std::os::fd::FromRawFd;
    use std::os::raw::{c_char, c_int};

    unsafe extern "C" {
        fn launch_activate_socket(
            name: *const c_char,
            fds: *mut *mut c_int,
            cnt: *mut usize,
        ) -> c_int;
    }

    let Ok(cname) = CString::new(name) else {
        return Ok(Vec::new());
    };
    let mut fds: *mut c_int = std::ptr::null_mut();
    let mut cnt: usize = 0;
    // SAFETY: `cname` is a valid NUL-terminated string; `fds` and `cnt` are valid out
    // pointers. On success launchd returns a malloc'd array of `cnt` descriptors we own.
    let rc = unsafe { launch_activate_socket(cname.as_ptr(), &mut fds, &mut cnt) };
    if rc != 0 {
        // The error is the return value itself, not `errno`.
        return match rc {
            libc::ESRCH | libc::ENOENT => Ok(Vec::new()),
            _ => Err(io::Error::from_raw_os_error(rc)),
        };
    }
    let mut out = Vec::with_capacity(cnt);
    for i in 0..cnt {
        // SAFETY: launchd returned `cnt` descriptors in `fds`; each is ours to own once.
        out.push(unsafe { OwnedFd::from_raw_fd(*fds.add(i)) });
    }
    // SAFETY: the array was allocated by launchd with malloc and is not used after this.
    unsafe { libc::free(fds.cast()) };
    Ok(out)
}

/// Not macOS: launchd never holds a socket.
#[cfg(not(target_os = "macos"))]
pub fn activate(_name: &str) -> io::Result<Vec<OwnedFd>> {
    Ok(Vec::new())
}
