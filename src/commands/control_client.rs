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

/// The packaged units' control socket (`hermes-gateway-control.socket`).
pub const SYSTEM_CONTROL_SOCKET: &str = "/run/hermes-gateway/control.sock";

/// The control socket to talk to: `explicit` if given; otherwise the first of the
/// configured path, the packaged system socket and the per-user one that answers, so that
/// `sudo hermes-gateway status` finds the system service without flags. When none answers,
/// the configured path (for the error message).
pub fn find_socket(
    explicit: Option<&Path>,
    configured: Option<&Path>,
) -> Option<std::path::PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    let mut candidates: Vec<std::path::PathBuf> = Vec::new();
    if let Some(c) = configured {
        candidates.push(c.to_path_buf());
    }
    candidates.push(SYSTEM_CONTROL_SOCKET.into());
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        candidates.push(std::path::PathBuf::from(x).join("hermes-gateway/control.sock"));
    }
    candidates.dedup();
    candidates
        .iter()
        .find(|p| UnixStream::connect(p).is_ok())
        .cloned()
        .or_else(|| candidates.into_iter().next())
}

/// The control socket the configuration names, for client commands. A configuration that
/// cannot be resolved (say, no HOME in a bare root shell) is not fatal here unless the file
/// was given explicitly: the packaged and per-user sockets are still tried.
pub fn configured_socket(config: Option<&Path>) -> Result<Option<std::path::PathBuf>, String> {
    match crate::config::Config::load_or_default(config) {
        Ok(c) => Ok(match c.listen.control {
            crate::config::ListenAddr::Unix(p) => Some(p),
            _ => None,
        }),
        // A file that does not validate (the reload that is about to be refused, say) still
        // names its control socket: read just that key.
        Err(e) => {
            match config.and_then(lenient_control) {
                Some(p) => Ok(Some(p)),
                None if config.is_some()
                    && !matches!(e, crate::config::ConfigError::Invalid { .. }) =>
                {
                    Err(e.to_string())
                }
                None => Ok(crate::config::Config::defaults().ok().and_then(|c| {
                    match c.listen.control {
                        crate::config::ListenAddr::Unix(p) => Some(p),
                        _ => None,
                    }
                })),
            }
        }
    }
}

fn lenient_control(path: &Path) -> Option<std::path::PathBuf> {
    let text = std::fs::read_to_string(path).ok()?;
    let table: toml::Table = text.parse().ok()?;
    let control = table.get("listen")?.get("control")?.as_str()?;
    match crate::config::ListenAddr::parse(control).ok()? {
        crate::config::ListenAddr::Unix(p) => Some(p),
        _ => None,
    }
}
