//! Telegram in polling mode against the stub Bot API: updates answered in order per chat,
//! offsets confirmed only after their commit, resumption from the stored offset, commands,
//! access rules, long replies, and the platform's errors.

mod common;
mod telegram_support;

use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use serde_json::json;
use telegram_support::*;

const WAIT: Duration = Duration::from_secs(30);

fn start(stub: &Stub, extra: &str) -> (Setup, Gateway) {
    let setup = Setup::new("127.0.0.1:0", &telegram_config(stub, extra));
    let gw = start_ready(&setup);
    (setup, gw)
}

fn start_ready(setup: &Setup) -> Gateway {
    let _ = std::fs::remove_file(setup.dir.path().join("notify.sock"));
    let notify = setup.notify();
    let gw = setup.spawn(
        &[],
        &[("NOTIFY_SOCKET", notify.path.to_str().expect("utf-8"))],
    );
    notify.wait_for("READY=1", Duration::from_secs(20));
    gw
}

#[test]
fn updates_are_answered_in_order_per_chat_and_offsets_follow_commits() {
    let stub = Stub::start();
    let (setup, mut gw) = start(&stub, "allow_all = true\npoll_timeout = \"5s\"");
    for i in 0..5 {
        for chat in [11, 22, 33] {
            stub.push(text_update(chat, chat, 100 + i, &format!("c{chat} m{i}")));
        }
    }
    let got = stub.wait_delivered(WAIT, |d| d.len() >= 15);
    let chats = by_chat(&got);
    for chat in [11, 22, 33] {
        let want: Vec<String> = (0..5).map(|i| format!("c{chat} m{i}")).collect();
        assert_eq!(chats[&chat], want, "chat {chat} in order, each once");
    }
    // Each reply quotes the message it answers.
    for c in &got {
        let i: i64 = c.text().rsplit('m').next().unwrap().parse().unwrap();
        assert_eq!(c.reply_to(), Some(100 + i), "{c:?}");
    }
    // The batch was confirmed by the next poll, never before.
    let last = stub.next_update_id() - 1;
    let end = std::time::Instant::now() + WAIT;
    while stub.confirmed() <= last {
        assert!(
            std::time::Instant::now() < end,
            "offset {} never confirmed",
            last + 1
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A restart resumes from the stored offset: nothing is fetched twice.
    gw.signal(Signal::SIGTERM);
    assert!(gw.wait(Duration::from_secs(10)).success());
    let polls_before = stub.polls().len();
    let _gw = start_ready(&setup);
    let end = std::time::Instant::now() + WAIT;
    while stub.polls().len() == polls_before {
        assert!(std::time::Instant::now() < end, "no poll after the restart");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(stub.polls()[polls_before], Some(last + 1));
    stub.push(text_update(11, 11, 200, "after restart"));
    let got = stub.wait_delivered(WAIT, |d| d.len() >= 16);
    assert_eq!(got.len(), 16, "nothing answered twice");
    assert_eq!(got[15].text(), "after restart");
}

#[test]
fn a_drain_abandons_the_long_poll_in_flight() {
    let stub = Stub::start();
    let (_setup, mut gw) = start(&stub, "allow_all = true\npoll_timeout = \"50s\"");
    let end = std::time::Instant::now() + WAIT;
    while stub.polls().is_empty() {
        assert!(std::time::Instant::now() < end, "never polled");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let t = std::time::Instant::now();
    gw.signal(Signal::SIGTERM);
    assert!(gw.wait(Duration::from_secs(10)).success());
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "the stop waited {:?} for the poll",
        t.elapsed()
    );
}

#[test]
fn non_text_updates_are_let_go_and_confirmed() {
    let stub = Stub::start();
    let (_setup, _gw) = start(&stub, "allow_all = true\npoll_timeout = \"5s\"");
    let sticker = stub.push(json!({"message": {"message_id": 1, "date": 1,
        "chat": {"id": 5, "type": "private"}, "from": {"id": 5, "is_bot": false, "first_name": "A"},
        "sticker": {"file_id": "x"}}}));
    stub.push(json!({"edited_message": {"message_id": 1, "date": 1,
        "chat": {"id": 5, "type": "private"}, "from": {"id": 5, "is_bot": false, "first_name": "A"},
        "text": "edited"}}));
    stub.push(json!({"callback_query": {"id": "q", "from": {"id": 5}, "data": "x"}}));
    stub.push(json!({"message": {"message_id": 2, "date": 1,
        "chat": {"id": 5, "type": "private"}, "from": {"id": 5, "is_bot": false, "first_name": "A"},
        "photo": [{"file_id": "p"}], "caption": "a caption"}}));
    stub.push(json!({"message": "not an object"}));
    let got = stub.wait_delivered(WAIT, |d| !d.is_empty());
    assert_eq!(got[0].text(), "a caption");
    let last = stub.next_update_id() - 1;
    let end = std::time::Instant::now() + WAIT;
    while stub.confirmed() <= last {
        assert!(
            std::time::Instant::now() < end,
            "the batch was never confirmed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(stub.delivered().len(), 1, "only the caption is answered");
    assert!(sticker > 0);
}
