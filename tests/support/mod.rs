//! Test support shared by the integration tests (`mod support;` in a `tests/*.rs` file).
//!
//! - [`sdbox`]: a REAL systemd (the host's systemd 252 as PID 1, with journald) in throw-away
//!   namespaces, driven from the test (`systemctl`, journal, files, client sockets in its netns).
//! - [`load`]: an HTTP/1.1 keep-alive load client that classifies every failed request, for
//!   "zero failed requests during restarts" tests.
//!
//! Each test binary uses a subset, hence the `dead_code` allowance.
#![allow(dead_code)]

pub mod load;
pub mod sdbox;
