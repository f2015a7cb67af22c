use std::time::Duration;

use super::*;
use crate::gateway::agents::{AgentFuture, DeltaSink, Reply};

/// Replies with the number of messages it was given: the history it saw, plus one.
struct Count;

impl Agent for Count {
    fn run<'a>(&'a self, input: &'a TurnInput, _: DeltaSink<'a>) -> AgentFuture<'a> {
        Box::pin(async move { Ok(Reply::text(input.messages.len().to_string())) })
    }

    fn kind(&self) -> &'static str {
        "count"
    }
}

fn chat(session: &str) -> (Turn, oneshot::Receiver<Result<Reply, TurnError>>) {
    let (done, rx) = oneshot::channel();
    let turn = Turn {
        run_id: crate::gateway::ids::new_id("chatcmpl"),
        session_id: Some(session.to_owned()),
        session_key: None,
        instructions: None,
        messages: vec![json!({"role": "user", "content": "hi"})],
        model: "m".into(),
        params: Map::new(),
        stream: false,
        kind: TurnKind::Chat {
            deltas: None,
            done,
            record: None,
        },
    };
    (turn, rx)
}

async fn turn(sessions: &Sessions, session: &str) -> String {
    let (t, rx) = chat(session);
    sessions.submit(t).expect("accepted");
    rx.await.expect("answered").expect("a reply").text
}

/// Keeps the store's writer busy for `ms` milliseconds: writes queued meanwhile wait.
fn hold_writer(store: &Store, ms: u64) -> tokio::task::JoinHandle<Result<(), StoreError>> {
    let store = store.clone();
    tokio::spawn(async move {
        store
            .write(move |_| {
                std::thread::sleep(Duration::from_millis(ms));
                Ok(())
            })
            .await
    })
}

/// A turn that arrives while its session is being deleted runs after the delete, in a
/// new session: it neither sees the deleted history nor writes into what was deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_arriving_during_a_delete_starts_a_new_session() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let sessions = Sessions::new(store.clone(), Arc::new(Count), &SessionsConfig::default());
    assert_eq!(turn(&sessions, "s").await, "1");
    assert_eq!(
        turn(&sessions, "s").await,
        "3",
        "the first turn's two messages, then one"
    );

    // Hold the writer, so that the delete's commit waits while a turn arrives.
    let blocker = hold_writer(&store, 400);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let deleting = {
        let s = sessions.clone();
        tokio::spawn(async move { s.delete("s").await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (t, rx) = chat("s");
    sessions.submit(t).expect("accepted behind the delete");

    assert_eq!(
        deleting.await.expect("joined").expect("deleted"),
        Deleted::Deleted
    );
    assert_eq!(
        rx.await.expect("answered").expect("a reply").text,
        "1",
        "the turn ran after the delete, on an empty history"
    );
    blocker.await.expect("joined").expect("blocker");
    let stored = store
        .read(|c| store::sessions::recent(c, "s", 100))
        .await
        .expect("read");
    assert_eq!(stored.0, 2, "only the new turn's two messages: {stored:?}");
    assert!(!sessions.is_busy("s"), "the session is idle again");
}

/// A delete refuses a session with a turn running, and deletes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_refuses_a_busy_session_and_answers_a_missing_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let sessions = Sessions::new(store.clone(), Arc::new(Count), &SessionsConfig::default());
    assert_eq!(
        sessions.delete("nobody").await.expect("delete"),
        Deleted::Missing
    );
    assert_eq!(turn(&sessions, "s").await, "1");
    // Hold the writer so that the next turn is still running (storing) at the delete.
    let blocker = hold_writer(&store, 300);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (t, rx) = chat("s");
    sessions.submit(t).expect("accepted");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(sessions.delete("s").await.expect("delete"), Deleted::Busy);
    assert_eq!(rx.await.expect("answered").expect("a reply").text, "3");
    blocker.await.expect("joined").expect("blocker");
    assert_eq!(
        sessions.delete("s").await.expect("delete"),
        Deleted::Deleted
    );
}
