//! `echo`: replies with the text of the last user message, so a fresh install answers.

use serde_json::Value;

use super::{Agent, AgentFuture, Delta, DeltaSink, Reply, TurnInput, content_text};

pub struct Echo;

impl Agent for Echo {
    fn run<'a>(&'a self, input: &'a TurnInput, on_delta: DeltaSink<'a>) -> AgentFuture<'a> {
        Box::pin(async move {
            let reply = input
                .messages
                .iter()
                .rev()
                .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
                .map(|m| content_text(m))
                .unwrap_or_default();
            on_delta(Delta::Text(&reply));
            Ok(Reply::text(reply))
        })
    }

    fn kind(&self) -> &'static str {
        "echo"
    }
}
