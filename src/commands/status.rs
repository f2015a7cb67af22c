use crate::cli::StatusArgs;
use crate::lifecycle::ExitStatus;

use super::control_client;

pub fn run(args: &StatusArgs) -> ExitStatus {
    let configured = match control_client::configured_socket(args.config.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hermes-gateway: {e}");
            return ExitStatus::Config;
        }
    };
    let Some(socket) = control_client::find_socket(args.socket.as_deref(), configured.as_deref())
    else {
        eprintln!("hermes-gateway: no control socket configured; pass --socket PATH");
        return ExitStatus::Config;
    };
    let body = match control_client::request(&socket, "GET", "/status") {
        Ok((200, body)) => body,
        Ok((code, body)) => {
            eprintln!("hermes-gateway: status request answered {code}: {body}");
            return ExitStatus::Fatal;
        }
        Err(e) => {
            eprintln!("hermes-gateway: {e}");
            return ExitStatus::Fatal;
        }
    };
    if args.json {
        println!("{body}");
        return ExitStatus::Stopped;
    }
    match serde_json::from_str::<serde_json::Value>(&body) {
        Ok(v) => {
            print!("{}", render(&v));
            ExitStatus::Stopped
        }
        Err(e) => {
            eprintln!("hermes-gateway: unreadable status answer ({e}): {body}");
            ExitStatus::Fatal
        }
    }
}

fn render(v: &serde_json::Value) -> String {
    let s = |k: &str| {
        v[k].as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| v[k].to_string())
    };
    let mut out = format!(
        "hermes-gateway {} (PID {}): {}, up {}s, supervisor {}\n  config: {}\n  state:  {}\n  connections: {}, requests served: {}\n",
        s("version"),
        s("pid"),
        s("state"),
        s("uptime_secs"),
        s("supervisor"),
        s("config"),
        s("state_dir"),
        s("connections"),
        s("requests"),
    );
    if v["store"]["status"] == "degraded" {
        out.push_str(&format!(
            "  store: DEGRADED, writes are refused with 503 until a commit succeeds: {}\n",
            v["store"]["error"].as_str().unwrap_or("?")
        ));
    }
    if let Some(ls) = v["listeners"].as_array() {
        out.push_str("  listeners:\n");
        for l in ls {
            let parked = if l["parked"].as_bool() == Some(true) {
                ", parked in fd store"
            } else {
                ""
            };
            out.push_str(&format!(
                "    {:<8} {} ({}{parked})\n",
                l["name"].as_str().unwrap_or("?"),
                l["address"].as_str().unwrap_or("?"),
                l["origin"].as_str().unwrap_or("?"),
            ));
        }
    }
    if let Some(ps) = v["platforms"].as_array().filter(|p| !p.is_empty()) {
        out.push_str("  platforms:\n");
        for p in ps {
            let backlog = match p["backlog"].as_i64() {
                Some(n) => format!("{n} waiting"),
                None => "backlog unknown".into(),
            };
            out.push_str(&format!(
                "    {}:{:<12} {} ({}), {backlog}",
                p["platform"].as_str().unwrap_or("?"),
                p["name"].as_str().unwrap_or("?"),
                p["state"].as_str().unwrap_or("?"),
                p["mode"].as_str().unwrap_or("?"),
            ));
            if let Some(e) = p["last_error"].as_str() {
                out.push_str(&format!("; last error: {e}"));
            }
            out.push('\n');
        }
    }
    if let (Some(name), Some(at)) = (
        v["next_schedule"]["name"].as_str(),
        v["next_schedule"]["at"].as_str(),
    ) {
        out.push_str(&format!("  next schedule: {name} at {at}\n"));
    }
    if let Some(r) = v["last_reload"].as_object() {
        match r.get("error").and_then(|e| e.as_str()) {
            Some(e) => out.push_str(&format!("  last reload FAILED: {e}\n")),
            None => out.push_str("  last reload: ok\n"),
        }
    }
    out
}
