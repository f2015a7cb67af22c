//! launchd socket activation (`launch_activate_socket(3)`), macOS only.
//!
//! The plist's `Sockets` dictionary names the sockets; launchd hands every descriptor of a
//! name at once (IPv4 and IPv6 apart), and each of them is served.

use std::os::fd::OwnedFd;

use super::listeners::Notes;

#[cfg(target_os = "macos")]
pub fn activate(name: &str, notes: &mut Notes) -> Vec<(OwnedFd, String)> {
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
        return Vec::new();
    };
    let mut fds: *mut c_int = std::ptr::null_mut();
    let mut cnt: usize = 0;
    // SAFETY: `cname` is a valid NUL-terminated string; `fds` and `cnt` are valid out
    // pointers. On success launchd returns a malloc'd array of `cnt` descriptors we own.
    let rc = unsafe { launch_activate_socket(cname.as_ptr(), &mut fds, &mut cnt) };
    if rc != 0 {
        // ESRCH: not managed by launchd; ENOENT: no socket of that name. Both are normal.
        if rc != libc::ESRCH && rc != libc::ENOENT {
            notes.push((
                tracing::Level::WARN,
                format!("launch_activate_socket({name}) failed: errno {rc}"),
            ));
        }
        return Vec::new();
    }
    let mut out = Vec::with_capacity(cnt);
    for i in 0..cnt {
        // SAFETY: launchd returned `cnt` descriptors in `fds`; each is ours to own once.
        let fd = unsafe { OwnedFd::from_raw_fd(*fds.add(i)) };
        let address = super::listeners::local_address(&fd);
        out.push((fd, address));
    }
    // SAFETY: the array was allocated by launchd with malloc and is not used after this.
    unsafe { libc::free(fds.cast()) };
    out
}

#[cfg(not(target_os = "macos"))]
pub fn activate(_name: &str, _notes: &mut Notes) -> Vec<(OwnedFd, String)> {
    Vec::new()
}
