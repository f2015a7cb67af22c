//! `hermes-gateway pairing list|approve|revoke`: who may talk to the agent through a chat
//! platform with `pairing = true`, over the control socket.

use serde_json::Value;

use crate::cli::{ControlArgs, PairingApproveArgs, PairingRevokeArgs};
use crate::lifecycle::ExitStatus;

use super::deliveries::{call, error_message};

/// A path segment: codes and user ids are plain, anything else is refused here.
fn plain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

pub fn list(args: &ControlArgs) -> ExitStatus {
    let body = match call(args, "GET", "/pairing") {
        Ok((200, body)) => body,
        Ok((code, body)) => {
            eprintln!(
                "hermes-gateway: pairing list answered {code}: {}",
                error_message(&body)
            );
            return ExitStatus::Fatal;
        }
        Err(s) => return s,
    };
    if args.json {
        println!("{body}");
        return ExitStatus::Stopped;
    }
    let Ok(v) = serde_json::from_str::<Value>(&body) else {
        eprintln!("hermes-gateway: unreadable answer: {body}");
        return ExitStatus::Fatal;
    };
    print!("{}", render(&v));
    ExitStatus::Stopped
}

fn render(v: &Value) -> String {
    let rows = v["data"].as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        return "no pairing requests and no approved users\n".into();
    }
    let mut out = format!(
        "{:<10} {:<20} {:<12} {:<9} {:<10} {}\n",
        "PLATFORM", "NAME", "USER", "STATE", "CODE", "WHO"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<10} {:<20} {:<12} {:<9} {:<10} {}\n",
            r["platform"].as_str().unwrap_or("?"),
            r["name"].as_str().unwrap_or("?"),
            r["user_id"].as_str().unwrap_or("?"),
            r["state"].as_str().unwrap_or("?"),
            r["code"].as_str().unwrap_or("-"),
            r["display"].as_str().unwrap_or(""),
        ));
    }
    out
}

pub fn approve(args: &PairingApproveArgs) -> ExitStatus {
    let code = args.code.trim().to_ascii_uppercase();
    if !plain(&code) {
        eprintln!(
            "hermes-gateway: `{}` is not a pairing code (see `hermes-gateway pairing list`)",
            args.code.escape_default()
        );
        return ExitStatus::Config;
    }
    match call(&args.control, "POST", &format!("/pairing/{code}/approve")) {
        Ok((200, body)) => {
            if args.control.json {
                println!("{body}");
            } else {
                let v: Value = serde_json::from_str(&body).unwrap_or_default();
                println!(
                    "approved {} (user {}) on {} `{}`: they are told in their chat",
                    v["display"].as_str().unwrap_or("?"),
                    v["user_id"].as_str().unwrap_or("?"),
                    v["platform"].as_str().unwrap_or("?"),
                    v["name"].as_str().unwrap_or("?"),
                );
            }
            ExitStatus::Stopped
        }
        Ok((code, body)) => {
            eprintln!(
                "hermes-gateway: approve answered {code}: {}",
                error_message(&body)
            );
            ExitStatus::Fatal
        }
        Err(s) => s,
    }
}

pub fn revoke(args: &PairingRevokeArgs) -> ExitStatus {
    if !plain(&args.user) {
        eprintln!(
            "hermes-gateway: `{}` is not a user id",
            args.user.escape_default()
        );
        return ExitStatus::Config;
    }
    let mut path = format!("/pairing/revoke/{}", args.user);
    let mut sep = '?';
    for (k, v) in [("platform", &args.platform), ("name", &args.name)] {
        if let Some(v) = v {
            if !plain(v) {
                eprintln!("hermes-gateway: `{}` is not a {k}", v.escape_default());
                return ExitStatus::Config;
            }
            path.push_str(&format!("{sep}{k}={v}"));
            sep = '&';
        }
    }
    match call(&args.control, "POST", &path) {
        Ok((200, body)) => {
            if args.control.json {
                println!("{body}");
            } else {
                let v: Value = serde_json::from_str(&body).unwrap_or_default();
                for r in v["data"].as_array().cloned().unwrap_or_default() {
                    println!(
                        "revoked user {} on {} `{}` (was {})",
                        r["user_id"].as_str().unwrap_or("?"),
                        r["platform"].as_str().unwrap_or("?"),
                        r["name"].as_str().unwrap_or("?"),
                        r["state"].as_str().unwrap_or("?"),
                    );
                }
            }
            ExitStatus::Stopped
        }
        Ok((code, body)) => {
            eprintln!(
                "hermes-gateway: revoke answered {code}: {}",
                error_message(&body)
            );
            ExitStatus::Fatal
        }
        Err(s) => s,
    }
}
