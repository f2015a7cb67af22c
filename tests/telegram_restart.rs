//! `/restart` from a chat: for admins only; the gateway restarts exactly as on SIGUSR1
//! (exit 75 under a supervisor, a re-exec in place otherwise); the command is recorded as
//! handled before the restart begins, so a redelivered `/restart` never restarts it twice;
//! after the relaunch the chat is told once, with how long it took.

mod common;
mod telegram_support;

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use common::*;
use telegram_support::*;

const WAIT: Duration = Duration::from_secs(30);
const SECRET: &str = "restart-secret";
const ADMIN: i64 = 42;

fn restart_update(id: i64, user: i64) -> String {
    let mut u = text_update(user, user, id, "/restart");
    u["update_id"] = id.into();
    u.to_string()
}

fn post(hook: SocketAddr, body: &str) -> u16 {
    let end = Instant::now() + WAIT;
    loop {
        if let Ok(r) = request(
            hook,
            "POST",
            "/platforms/telegram/main",
            &[("X-Telegram-Bot-Api-Secret-Token", SECRET)],
            body,
        ) {
            return r.status;
        }
        assert!(Instant::now() < end, "the webhook listener never answered");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn notices(stub: &Stub) -> usize {
    stub.delivered()
        .iter()
        .filter(|c| c.text().contains("The gateway restarted"))
        .count()
}

#[test]
fn supervised_restart_exits_75_once_even_when_the_update_comes_again() {
    let stub = Stub::start();
    let setup = Setup::new("127.0.0.1:0", "");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let hook = listener.local_addr().unwrap();
    setup.write_config(&format!(
        "[listen]\napi = \"off\"\nwebhook = \"127.0.0.1:1\"\ncontrol = \"{}\"\n[state]\ndir = \"{}\"\n{}",
        setup.control.display(),
        setup.state.display(),
        telegram_config(
            &stub,
            &format!(
                "mode = \"webhook\"\nwebhook_secret = \"{SECRET}\"\nallow_all = true\nadmins = [{ADMIN}]"
            )
        )
    ));
    let notify_path = setup.dir.path().join("notify.sock");
    let launch = || {
        let _ = std::fs::remove_file(&notify_path);
        let notify = setup.notify();
        let gw = spawn_with_socket(&setup, &listener, "webhook", &notify, "info");
        notify.wait_for("READY=1", Duration::from_secs(20));
        gw
    };
    let mut gw = launch();
    // Not an admin: refused, nothing restarts.
    assert_eq!(post(hook, &restart_update(500, 7)), 200);
    let got = stub.wait_delivered(WAIT, |d| !d.is_empty());
    assert!(got[0].text().contains("Only an admin"), "{}", got[0].text());
    // An admin: the gateway drains and exits 75 for its supervisor.
    assert_eq!(post(hook, &restart_update(501, ADMIN)), 200);
    let st = gw.wait(WAIT);
    assert_eq!(st.code(), Some(75), "{}", gw.stderr());
    let t = Instant::now();
    let gw2 = launch();
    let relaunched_in = t.elapsed();
    let got = stub.wait_delivered(WAIT, |d| d.len() == 2);
    assert!(
        got[1].text().contains("The gateway restarted"),
        "{}",
        got[1].text()
    );
    assert_eq!(got[1].chat(), ADMIN);
    let secs: f64 = got[1]
        .text()
        .split("took ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .expect("the notice says how long it took");
    assert!((0.0..30.0).contains(&secs), "{secs}");
    // Telegram sends the same update again (say the 200 was lost): no second restart.
    assert_eq!(post(hook, &restart_update(501, ADMIN)), 200);
    std::thread::sleep(Duration::from_secs(2));
    let mut gw2 = gw2;
    assert!(gw2.child.try_wait().unwrap().is_none(), "restarted twice");
    assert_eq!(notices(&stub), 1, "told once");
    eprintln!("relaunched in {relaunched_in:?}");
    gw2.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(gw2.wait(WAIT).code(), Some(0));
}

#[test]
fn unsupervised_restart_re_executes_in_place_and_polling_goes_on() {
    let stub = Stub::start();
    let setup = Setup::new(
        "127.0.0.1:0",
        &telegram_config(
            &stub,
            &format!("allow_all = true\nadmins = [{ADMIN}]\npoll_timeout = \"2s\""),
        ),
    );
    let notify = setup.notify();
    let mut gw = setup.spawn(
        &["--supervisor", "none"],
        &[("NOTIFY_SOCKET", notify.path.to_str().expect("utf-8"))],
    );
    notify.wait_for("READY=1", Duration::from_secs(20));
    let pid = gw.pid();
    let id = stub.next_update_id();
    stub.push(text_update(ADMIN, ADMIN, id, "/restart"));
    notify.wait_for("STOPPING=1", WAIT);
    notify.wait_for("READY=1", WAIT);
    let got = stub.wait_delivered(WAIT, |d| !d.is_empty());
    assert!(
        got[0].text().contains("The gateway restarted"),
        "{}",
        got[0].text()
    );
    assert_eq!(gw.pid(), pid, "the same process, re-executed");
    assert!(gw.child.try_wait().unwrap().is_none());
    // Polling resumed past the /restart: it is not read again, and new messages flow.
    let id = stub.next_update_id();
    stub.push(text_update(ADMIN, ADMIN, id, "still here"));
    let got = stub.wait_delivered(WAIT, |d| d.len() == 2);
    assert_eq!(got[1].text(), "still here");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(notices(&stub), 1, "told once, restarted once");
    assert!(
        notify
            .drain(Duration::from_millis(300))
            .iter()
            .all(|l| !l.contains("STOPPING=1")),
        "no second restart"
    );
    gw.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(gw.wait(WAIT).code(), Some(0));
}

#[test]
fn unsupervised_webhook_restart_is_not_repeated_by_a_redelivered_update() {
    let stub = Stub::start();
    let setup = Setup::new(
        "127.0.0.1:0",
        &telegram_config(
            &stub,
            &format!(
                "mode = \"webhook\"\nwebhook_secret = \"{SECRET}\"\nallow_all = true\nadmins = [{ADMIN}]"
            ),
        ),
    );
    let text = std::fs::read_to_string(&setup.config)
        .unwrap()
        .replace("webhook = \"off\"", "webhook = \"127.0.0.1:0\"");
    setup.write_config(&text);
    let notify = setup.notify();
    let mut gw = setup.spawn(
        &["--supervisor", "none"],
        &[("NOTIFY_SOCKET", notify.path.to_str().expect("utf-8"))],
    );
    notify.wait_for("READY=1", Duration::from_secs(20));
    let hook = listener_addr(&setup.control, "webhook");
    assert_eq!(post(hook, &restart_update(700, ADMIN)), 200);
    notify.wait_for("STOPPING=1", WAIT);
    notify.wait_for("READY=1", WAIT);
    stub.wait_delivered(WAIT, |d| notices_in(d) == 1);
    // The same update again, on the handed-over socket: answered, nothing restarts.
    assert_eq!(post(hook, &restart_update(700, ADMIN)), 200);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        notify
            .drain(Duration::from_millis(300))
            .iter()
            .all(|l| !l.contains("STOPPING=1")),
        "no second restart"
    );
    assert_eq!(notices(&stub), 1);
    assert!(gw.child.try_wait().unwrap().is_none());
    gw.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(gw.wait(WAIT).code(), Some(0));
}

fn notices_in(d: &[Call]) -> usize {
    d.iter()
        .filter(|c| c.text().contains("The gateway restarted"))
        .count()
}
