//! A minimal HTTP/1.1 client for the control socket (one request, `Connection: close`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "cannot reach the gateway's control socket {path}: {source} (is the gateway running? `--socket PATH` names another socket)"
    )]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("control socket {path}: {message}")]
    Protocol { path: String, message: String },
}

/// Sends `METHOD path` and returns the status code and body.
pub fn request(socket: &Path, method: &str, path: &str) -> Result<(u16, String), ControlError> {
    let shown = socket.display().to_string();
    let connect = |source| ControlError::Connect {
        path: shown.clone(),
        source,
    };
    let proto = |message: String| ControlError::Protocol {
        path: shown.clone(),
        message,
    };
    let mut s = UnixStream::connect(socket).map_err(connect)?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    write!(s, "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        .map_err(|e| proto(e.to_string()))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| proto(e.to_string()))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| proto("incomplete HTTP response".into()))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            proto(format!(
                "bad status line: {}",
                head.lines().next().unwrap_or("")
            ))
        })?;
    Ok((code, body.to_owned()))
}
