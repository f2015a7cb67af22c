//! `hermes-gateway deliveries list|retry`: the delivery ledger over the control socket.

use serde_json::Value;

use crate::cli::{ControlArgs, DeliveriesListArgs, DeliveriesRetryArgs};
use crate::lifecycle::ExitStatus;

use super::control_client;

/// Sends `METHOD path` to the gateway; prints the problem and returns the exit status on
/// failure.
pub(crate) fn call(
    args: &ControlArgs,
    method: &str,
    path: &str,
) -> Result<(u16, String), ExitStatus> {
    let configured =
        control_client::configured_socket(args.config.config.as_deref()).map_err(|e| {
            eprintln!("hermes-gateway: {e}");
            ExitStatus::Config
        })?;
    let Some(socket) = control_client::find_socket(args.socket.as_deref(), configured.as_deref())
    else {
        eprintln!("hermes-gateway: no control socket configured; pass --socket PATH");
        return Err(ExitStatus::Config);
    };
    control_client::request(&socket, method, path).map_err(|e| {
        eprintln!("hermes-gateway: {e}");
        ExitStatus::Fatal
    })
}

pub(crate) fn error_message(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| body.trim().to_owned())
}

pub fn list(args: &DeliveriesListArgs) -> ExitStatus {
    let mut path = format!("/deliveries?limit={}", args.limit);
    if let Some(s) = &args.state {
        path.push_str(&format!("&state={s}"));
    }
    let body = match call(&args.control, "GET", &path) {
        Ok((200, body)) => body,
        Ok((code, body)) => {
            eprintln!(
                "hermes-gateway: deliveries list answered {code}: {}",
                error_message(&body)
            );
            return ExitStatus::Fatal;
        }
        Err(s) => return s,
    };
    if args.control.json {
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
    let mut out = String::new();
    let rows = v["data"].as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        out.push_str("no deliveries\n");
    } else {
        out.push_str(&format!(
            "{:<30} {:<16} {:<11} {:>8}  {}\n",
            "ID", "ROUTE", "STATE", "ATTEMPTS", "LAST ERROR"
        ));
    }
    for r in rows {
        out.push_str(&format!(
            "{:<30} {:<16} {:<11} {:>8}  {}\n",
            r["id"].as_str().unwrap_or("?"),
            r["route"].as_str().unwrap_or("?"),
            r["state"].as_str().unwrap_or("?"),
            r["attempts"],
            r["last_error"].as_str().unwrap_or(""),
        ));
    }
    if let Some(c) = v["counts"].as_object() {
        let parts: Vec<String> = c.iter().map(|(k, n)| format!("{k} {n}")).collect();
        out.push_str(&format!("totals: {}\n", parts.join(", ")));
    }
    out
}

pub fn retry(args: &DeliveriesRetryArgs) -> ExitStatus {
    if args.id.is_empty()
        || !args
            .id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        eprintln!(
            "hermes-gateway: `{}` is not a delivery id (dlv_…; see `hermes-gateway deliveries list`)",
            args.id.escape_default()
        );
        return ExitStatus::Config;
    }
    match call(
        &args.control,
        "POST",
        &format!("/deliveries/{}/retry", args.id),
    ) {
        Ok((202, body)) => {
            if args.control.json {
                println!("{body}");
            } else {
                println!("delivery {} queued for another attempt", args.id);
            }
            ExitStatus::Stopped
        }
        Ok((code, body)) => {
            eprintln!(
                "hermes-gateway: retry of {} answered {code}: {}",
                args.id,
                error_message(&body)
            );
            ExitStatus::Fatal
        }
        Err(s) => s,
    }
}
