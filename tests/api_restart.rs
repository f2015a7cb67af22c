//! A restart with a run in progress: a slow `command` agent, SIGUSR1 to the gateway under
//! a supervisor (this test) that relaunches it on exit 75 with the same listening socket.
//! The run completes after the relaunch and its events are complete; a stream open at the
//! drain deadline ends with a `gateway_restarting` error; no request made during the
//! restart fails.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;

const T: Duration = Duration::from_secs(30);

fn launch(setup: &Setup, listener: &TcpListener, notify: &NotifySink) -> Gateway {
    spawn_with_socket(setup, listener, "api", notify, "info")
}

fn events_of(addr: SocketAddr, id: &str) -> Vec<(String, Value)> {
    let r = request(addr, "GET", &format!("/v1/runs/{id}/events"), &[], "").unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.sse()
        .into_iter()
        .map(|(e, d)| {
            (
                e.unwrap_or_default(),
                serde_json::from_str(&d).unwrap_or(Value::Null),
            )
        })
        .collect()
}

#[test]
fn a_run_survives_a_supervised_restart_and_no_request_fails() {
    let agent = "import json,sys,time\njson.load(sys.stdin)\nprint('part one, ', end='', flush=True)\ntime.sleep(2.5)\nprint('part two', end='', flush=True)\n";
    let setup = Setup::new(
        "127.0.0.1:1",
        &format!(
            "[gateway]\ndrain_timeout = \"1500ms\"\nidle_grace = \"100ms\"\n[agent]\nbackend = \"command\"\ncommand = [\"python3\", \"-c\", {}]\n",
            Value::from(agent)
        ),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let notify = setup.notify();
    let mut first = launch(&setup, &listener, &notify);
    notify.wait_for("READY=1", T);

    let r = request(
        addr,
        "POST",
        "/v1/runs",
        &[],
        r#"{"input": "go", "session_id": "restart"}"#,
    )
    .unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.json()["run_id"].as_str().unwrap().to_owned();

    // A subscriber on the first gateway: its stream is cut by the restart.
    let cut = std::thread::spawn({
        let id = id.clone();
        move || request(addr, "GET", &format!("/v1/runs/{id}/events"), &[], "").unwrap()
    });
    // Wait until the first part was produced, so the run is mid-turn.
    let end = Instant::now() + T;
    loop {
        let v = request(addr, "GET", &format!("/v1/runs/{id}"), &[], "")
            .unwrap()
            .json();
        if v["status"] == "running" {
            break;
        }
        assert!(Instant::now() < end, "the run never started: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The agent prints its first part at once, then sleeps 2.5 s.
    std::thread::sleep(Duration::from_millis(500));

    // Load during the restart: fresh connections, health and the run's status.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let load = {
        let (stop, ok, id) = (stop.clone(), ok.clone(), id.clone());
        std::thread::spawn(move || {
            let mut failures = Vec::new();
            let end = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                for path in ["/health".to_owned(), format!("/v1/runs/{id}")] {
                    match request(addr, "GET", &path, &[], "") {
                        Ok(r) if r.status == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        other => failures.push(format!("{path}: {other:?}")),
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            failures
        })
    };
    std::thread::sleep(Duration::from_millis(200));

    first.signal(Signal::SIGUSR1);
    let status = first.wait(T);
    assert_eq!(status.code(), Some(75), "{}", first.stderr());
    // The supervisor relaunches on 75, with the same socket.
    let _ = std::fs::remove_file(&notify.path);
    let notify = setup.notify();
    let second = launch(&setup, &listener, &notify);
    notify.wait_for("READY=1", T);

    let cut = cut.join().unwrap();
    let last = cut.sse().last().cloned().unwrap_or_default();
    assert_eq!(
        last.0.as_deref(),
        Some("error"),
        "{}\n{}",
        cut.body,
        first.stderr()
    );
    assert!(last.1.contains("gateway_restarting"), "{last:?}");
    let error: serde_json::Value = serde_json::from_str(&last.1).unwrap();
    assert!(error["error"]["code"].is_null(), "{last:?}");

    // The run completes in the second gateway.
    let end = Instant::now() + T;
    let run = loop {
        let v = request(addr, "GET", &format!("/v1/runs/{id}"), &[], "")
            .unwrap()
            .json();
        if v["status"] == "completed" {
            break v;
        }
        assert!(
            Instant::now() < end && v["status"] != "failed",
            "{v}\n{}",
            second.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    stop.store(true, Ordering::Relaxed);
    let failures = load.join().unwrap();
    assert!(
        failures.is_empty(),
        "{} requests failed during the restart (of {} ok): {failures:?}",
        failures.len(),
        ok.load(Ordering::Relaxed)
    );
    assert!(ok.load(Ordering::Relaxed) > 10);
    assert_eq!(run["output"], "part one, part two");
    assert_eq!(run["attempt"], 2);

    // Its events are complete, in order, and say that it was resumed.
    let evs = events_of(addr, &id);
    let kinds: Vec<&str> = evs.iter().map(|(e, _)| e.as_str()).collect();
    let seqs: Vec<i64> = evs
        .iter()
        .map(|(_, d)| d["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as i64).collect::<Vec<_>>(),
        "{kinds:?}"
    );
    assert_eq!(kinds[0], "run.queued");
    assert_eq!(kinds[1], "run.started");
    let resumed = kinds
        .iter()
        .position(|k| *k == "run.resumed")
        .expect("run.resumed");
    assert_eq!(evs[resumed].1["attempt"], 2);
    assert_eq!(kinds[resumed + 1], "run.started");
    assert_eq!(*kinds.last().unwrap(), "run.completed");
    let after: String = evs[resumed..]
        .iter()
        .filter(|(e, _)| e == "message.delta")
        .map(|(_, d)| d["delta"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        after, "part one, part two",
        "the re-run's deltas are complete"
    );

    // The session has the turn once.
    let s = request(addr, "GET", "/v1/sessions/restart", &[], "")
        .unwrap()
        .json();
    assert_eq!(s["messages"].as_array().unwrap().len(), 2, "{s}");
}
