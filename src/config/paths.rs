//! Default folders, following the service manager first and the XDG spec second.

use std::env;
use std::path::{Path, PathBuf};

/// `$STATE_DIRECTORY`, else `$XDG_STATE_HOME/hermes-gateway`, else
/// `~/.local/state/hermes-gateway`.
pub fn default_state_dir() -> Result<PathBuf, String> {
    // systemd may pass several colon-separated folders; the first is ours.
    if let Some(d) = non_empty("STATE_DIRECTORY") {
        return Ok(PathBuf::from(d.split(':').next().unwrap_or(&d)));
    }
    if let Some(d) = non_empty("XDG_STATE_HOME") {
        return Ok(PathBuf::from(d).join("hermes-gateway"));
    }
    match non_empty("HOME") {
        Some(h) => Ok(PathBuf::from(h).join(".local/state/hermes-gateway")),
        None => Err(
            "no state folder: set [state] dir in the config file, or STATE_DIRECTORY, XDG_STATE_HOME or HOME"
                .into(),
        ),
    }
}

/// `$RUNTIME_DIRECTORY/control.sock`, else `$XDG_RUNTIME_DIR/hermes-gateway/control.sock`,
/// else `control.sock` in the state folder.
pub fn default_control_path(state_dir: &Path) -> PathBuf {
    if let Some(d) = non_empty("RUNTIME_DIRECTORY") {
        return PathBuf::from(d.split(':').next().unwrap_or(&d)).join("control.sock");
    }
    if let Some(d) = non_empty("XDG_RUNTIME_DIR") {
        return PathBuf::from(d).join("hermes-gateway/control.sock");
    }
    state_dir.join("control.sock")
}

fn non_empty(var: &str) -> Option<String> {
    env::var(var).ok().filter(|v| !v.is_empty())
}
