//! `hermes-gateway schedule list|run NAME`: the scheduled runs, over the control socket.

use serde_json::Value;

use crate::cli::{ControlArgs, ScheduleRunArgs};
use crate::lifecycle::ExitStatus;

use super::deliveries::{call, error_message};

pub fn list(args: &ControlArgs) -> ExitStatus {
    let body = match call(args, "GET", "/schedules") {
        Ok((200, body)) => body,
        Ok((code, body)) => {
            eprintln!(
                "hermes-gateway: schedule list answered {code}: {}",
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
        return "no schedules\n".into();
    }
    let mut out = format!("{:<20} {:<18} {:<24} {}\n", "NAME", "CRON", "NEXT", "LAST");
    for r in rows {
        let last = match r["last"].as_object() {
            None => "never".to_owned(),
            Some(l) => {
                let mut t = format!(
                    "{} {}",
                    l.get("slot").and_then(Value::as_str).unwrap_or("?"),
                    l.get("run_status")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown"),
                );
                if let Some(e) = l.get("error").and_then(Value::as_str) {
                    t.push_str(&format!(" ({e})"));
                }
                t
            }
        };
        out.push_str(&format!(
            "{:<20} {:<18} {:<24} {last}\n",
            r["name"].as_str().unwrap_or("?"),
            r["cron"].as_str().unwrap_or("?"),
            r["next_at"].as_str().unwrap_or("-"),
        ));
    }
    out
}

pub fn run(args: &ScheduleRunArgs) -> ExitStatus {
    if args.name.is_empty()
        || !args
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        eprintln!(
            "hermes-gateway: `{}` is not a schedule name (see `hermes-gateway schedule list`)",
            args.name.escape_default()
        );
        return ExitStatus::Config;
    }
    match call(
        &args.control,
        "POST",
        &format!("/schedules/{}/run", args.name),
    ) {
        Ok((202, body)) => {
            if args.control.json {
                println!("{body}");
            } else {
                let v: Value = serde_json::from_str(&body).unwrap_or_default();
                println!(
                    "schedule {} runs now (delivery {})",
                    args.name,
                    v["delivery_id"].as_str().unwrap_or("?")
                );
            }
            ExitStatus::Stopped
        }
        Ok((code, body)) => {
            eprintln!(
                "hermes-gateway: schedule run {} answered {code}: {}",
                args.name,
                error_message(&body)
            );
            ExitStatus::Fatal
        }
        Err(s) => s,
    }
}
