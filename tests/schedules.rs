//! Scheduled runs with a schedule every second or two (cron's optional seconds field):
//! runs at the right slots, once each; a SIGKILL while a slot's run is running runs it
//! once after the relaunch, never twice; downtime over slots with `missed = "run_once"`
//! and `"skip"`; a reload that changes a schedule; a bad expression refused; delivery to
//! the Telegram stub.

mod common;
mod telegram_support;
mod webhooks_support;

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use telegram_support::*;
use webhooks_support::*;

const WAIT: Duration = Duration::from_secs(30);

fn slot_ms(r: &Received) -> i64 {
    r.body["source_id"]
        .as_str()
        .and_then(|s| s.parse::<jiff::Timestamp>().ok())
        .map(|t| t.as_millisecond())
        .unwrap_or_else(|| panic!("a slot time: {}", r.body))
}

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

fn schedule(name: &str, cron: &str, extra: &str, rx: &Receiver) -> String {
    format!(
        "[[schedule]]\nname = \"{name}\"\ncron = \"{cron}\"\ntimezone = \"UTC\"\nprompt = \"prompt of {name}\"\ndeliver = {{ type = \"http\", url = \"{}\" }}\n{extra}\n",
        rx.url()
    )
}

fn start(setup: &Setup) -> (Gateway, NotifySink) {
    let _ = std::fs::remove_file(setup.dir.path().join("notify.sock"));
    let notify = setup.notify();
    let gw = setup.spawn(
        &[],
        &[("NOTIFY_SOCKET", notify.path.to_str().expect("utf-8"))],
    );
    notify.wait_for("READY=1", Duration::from_secs(20));
    (gw, notify)
}

fn cli(setup: &Setup, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .arg("--socket")
        .arg(&setup.control)
        .output()
        .expect("run the CLI");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn slots_run_once_each_at_their_time_and_the_cli_shows_them() {
    let rx = Receiver::start(|_, _| 200);
    let setup = Setup::new("127.0.0.1:0", &schedule("tick", "*/2 * * * * *", "", &rx));
    let (_gw, _n) = start(&setup);
    let got = rx.wait_until(WAIT, |g| g.len() >= 3);
    let mut slots: Vec<i64> = got.iter().map(slot_ms).collect();
    let arrived: Vec<i64> = got
        .iter()
        .map(|r| now_ms() - r.at.elapsed().as_millis() as i64)
        .collect();
    for (s, a) in slots.iter().zip(&arrived) {
        assert_eq!(s % 2000, 0, "an even second: {s}");
        assert!(
            a - s >= 0 && a - s < 1500,
            "delivered {}ms after its slot",
            a - s
        );
    }
    slots.sort_unstable();
    slots.dedup();
    assert_eq!(slots.len(), got.len(), "each slot once");
    for w in slots.windows(2) {
        assert_eq!(w[1] - w[0], 2000, "no slot skipped: {slots:?}");
    }
    for r in &got {
        assert_eq!(r.body["status"], "completed");
        assert_eq!(r.body["output"], "prompt of tick");
        assert_eq!(r.body["route"], "schedule:tick");
    }
    let (rc, out, err) = cli(&setup, &["schedule", "list"]);
    assert_eq!(rc, 0, "{err}");
    assert!(
        out.contains("tick") && out.contains("*/2 * * * * *"),
        "{out}"
    );
    assert!(out.contains("completed"), "{out}");
    let st = status_json(&setup.control);
    assert_eq!(st["next_schedule"]["name"], "tick");
    assert!(st["next_schedule"]["at_unix_ms"].as_i64().unwrap() > now_ms() - 2000);
    // `schedule run` runs it now, besides its slots.
    let before = rx.all().len();
    let (rc, out, err) = cli(&setup, &["schedule", "run", "tick"]);
    assert_eq!(rc, 0, "{err}");
    assert!(out.contains("runs now"), "{out}");
    let got = rx.wait_until(WAIT, |g| {
        g.iter().any(|r| {
            r.body["source_id"]
                .as_str()
                .unwrap_or("")
                .starts_with("manual:")
        })
    });
    assert!(got.len() > before);
    let (rc, _, err) = cli(&setup, &["schedule", "run", "nope"]);
    assert_ne!(rc, 0);
    assert!(err.contains("404") || err.contains("no schedule"), "{err}");
}

#[test]
fn a_sigkill_during_a_slots_run_runs_it_once_after_the_relaunch() {
    let rx = Receiver::start(|_, _| 200);
    let agent = format!(
        "[agent]\nbackend = \"command\"\ncommand = [\"python3\", \"-c\", {}]\n",
        serde_json::to_string(
            "import json,sys,time\nt=json.load(sys.stdin)\ntime.sleep(1.5)\nprint('done', end='')"
        )
        .unwrap()
    );
    let setup = Setup::new(
        "127.0.0.1:0",
        &format!("{agent}{}", schedule("slow", "*/4 * * * * *", "", &rx)),
    );
    let (mut gw, _n) = start(&setup);
    gw.wait_stderr("Z runs", WAIT);
    // The slot is recorded and its run is under way: kill it there.
    std::thread::sleep(Duration::from_millis(400));
    gw.signal(Signal::SIGKILL);
    let _ = gw.wait(Duration::from_secs(10));
    let killed_at = now_ms();
    let (gw2, _n2) = start(&setup);
    // The slot recorded before the kill runs after it (a slot missed meanwhile may run
    // beside it).
    let end = Instant::now() + WAIT;
    while !rx.all().iter().any(|r| slot_ms(r) < killed_at) {
        assert!(
            Instant::now() < end,
            "the slot recorded before the kill never ran; after the relaunch:\n{}",
            gw2.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let got = rx.all();
    let first = got
        .iter()
        .map(slot_ms)
        .filter(|s| *s < killed_at)
        .min()
        .unwrap();
    gw2.wait_stderr("resuming run", WAIT);
    std::thread::sleep(Duration::from_secs(2));
    let per_slot = rx.all().iter().fold(HashMap::new(), |mut m, r| {
        *m.entry(slot_ms(r)).or_insert(0) += 1;
        m
    });
    assert_eq!(per_slot[&first], 1, "once, not twice: {per_slot:?}");
    let db = rusqlite::Connection::open_with_flags(
        setup.state.join("gateway.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let stored: i64 = db
        .query_row(
            "SELECT count(*) FROM deliveries WHERE route = 'schedule:slow' AND source_id = ?1",
            [
                got.iter().find(|r| slot_ms(r) == first).unwrap().body["source_id"]
                    .as_str()
                    .unwrap(),
            ],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(stored, 1, "the slot was recorded once");
}

fn downtime(missed: &str) -> (Vec<i64>, i64, i64) {
    let rx = Receiver::start(|_, _| 200);
    let setup = Setup::new(
        "127.0.0.1:0",
        &schedule(
            "each",
            "* * * * * *",
            &format!("missed = \"{missed}\""),
            &rx,
        ),
    );
    let (mut gw, _n) = start(&setup);
    rx.wait_until(WAIT, |g| g.len() >= 2);
    gw.signal(Signal::SIGTERM);
    assert!(gw.wait(WAIT).success());
    let stopped = now_ms();
    std::thread::sleep(Duration::from_millis(3500));
    let started = now_ms();
    let (_gw, _n) = start(&setup);
    std::thread::sleep(Duration::from_millis(1500));
    let slots: Vec<i64> = rx.all().iter().map(slot_ms).collect();
    (slots, stopped, started)
}

#[test]
fn a_slot_missed_while_down_runs_once_with_run_once() {
    let (slots, stopped, started) = downtime("run_once");
    let during: Vec<i64> = slots
        .iter()
        .copied()
        .filter(|s| *s > stopped && *s < started)
        .collect();
    assert_eq!(during.len(), 1, "the latest missed slot, once: {during:?}");
    assert!(started - during[0] <= 1000, "the latest one");
}

#[test]
fn slots_missed_while_down_are_let_go_with_skip() {
    let (slots, stopped, started) = downtime("skip");
    let during: Vec<i64> = slots
        .iter()
        .copied()
        .filter(|s| *s > stopped + 999 && *s < started)
        .collect();
    assert!(during.is_empty(), "{during:?}");
    assert!(slots.iter().any(|s| *s > started), "and it goes on after");
}

#[test]
fn a_reload_changes_a_schedule_and_a_bad_expression_is_refused() {
    let rx = Receiver::start(|_, _| 200);
    let setup = Setup::new("127.0.0.1:0", &schedule("r", "* * * * * *", "", &rx));
    let (gw, _n) = start(&setup);
    rx.wait_until(WAIT, |g| !g.is_empty());
    let text = std::fs::read_to_string(&setup.config).unwrap();
    setup.write_config(&text.replace("prompt of r", "changed prompt"));
    gw.signal(Signal::SIGHUP);
    rx.wait_until(WAIT, |g| {
        g.iter().any(|r| r.body["output"] == "changed prompt")
    });
    // A bad expression: the reload is refused, naming the key; the schedule goes on.
    setup.write_config(&text.replace("* * * * * *", "every day at eight"));
    gw.signal(Signal::SIGHUP);
    let log = gw.wait_stderr("reload failed", WAIT);
    assert!(log.contains("schedule[0].cron"), "{log}");
    let n = rx.all().len();
    rx.wait_until(WAIT, |g| g.len() > n + 1);
    // At start, the same mistake exits 78.
    let mut gw = setup.spawn(&[], &[]);
    assert_eq!(gw.wait(WAIT).code(), Some(78), "{}", gw.stderr());
    assert!(gw.stderr().contains("schedule[0].cron"));
}

#[test]
fn a_schedule_delivers_to_a_telegram_chat() {
    let stub = Stub::start();
    let cfg = format!(
        "{}[[schedule]]\nname = \"brief\"\ncron = \"*/2 * * * * *\"\nprompt = \"the morning brief\"\ndeliver = {{ platform = \"telegram\", name = \"main\", chat = 4242 }}\n",
        telegram_config(&stub, "allow_all = true\npoll_timeout = \"2s\"")
    );
    let setup = Setup::new("127.0.0.1:0", &cfg);
    let (_gw, _n) = start(&setup);
    let got = stub.wait_delivered(WAIT, |d| !d.is_empty());
    assert_eq!(got[0].chat(), 4242);
    assert_eq!(got[0].text(), "the morning brief");
    assert_eq!(got[0].reply_to(), None);
    let start = Instant::now();
    stub.wait_delivered(WAIT, |d| d.len() >= 2);
    assert!(start.elapsed() < Duration::from_secs(5));
}
