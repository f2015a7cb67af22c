//! The commands the gateway answers itself, without the agent, even while a turn runs:
//! `/new` (`/reset`), `/stop`, `/status`, `/help`, `/start` and `/restart`. What the chat is
//! told in each case, and when it is refused, is written here once for every platform.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    New,
    Stop,
    Status,
    Help,
    Start,
    Restart,
}

/// The gateway command `text` is, if any: `/new`, `/reset`, … (case-insensitive, arguments
/// ignored). Platforms without slash commands pass the bare word with `words` set.
pub fn parse(text: &str, words: bool) -> Option<Command> {
    let t = text.trim();
    let word = match t.strip_prefix('/') {
        Some(w) => w,
        None if words => t,
        None => return None,
    };
    let word = word.split_whitespace().next()?.to_ascii_lowercase();
    if words && !t.starts_with('/') && t.split_whitespace().count() > 1 {
        // "stop the music" is a message, not a command.
        return None;
    }
    Some(match word.as_str() {
        "new" | "reset" => Command::New,
        "stop" => Command::Stop,
        "status" => Command::Status,
        "help" => Command::Help,
        "start" => Command::Start,
        "restart" => Command::Restart,
        _ => return None,
    })
}

pub const HELP: &str = "Talk to me in plain words; I answer each message in order.\n\n\
Commands:\n\
/new — start a new conversation (also /reset)\n\
/stop — stop the reply being written (queued messages stay)\n\
/status — this conversation and the gateway\n\
/help — this list\n\
/restart — restart the gateway (admins only)";

/// The commands, as the platform takes them: `/new`, or `new` where commands are plain
/// words (a `/word` would be taken by the platform's own client there).
pub fn help(words: bool) -> String {
    if words {
        HELP.replace('/', "")
    } else {
        HELP.to_owned()
    }
}

pub fn start(words: bool) -> String {
    if words {
        START.replace("/help", "help")
    } else {
        START.to_owned()
    }
}

pub const START: &str = "👋 Hello! I'm an AI agent behind hermes-gateway. Just write to me. Send /help for the commands.";

pub fn new_session(session: &str) -> String {
    format!("🆕 New conversation started ({session}). The previous one is kept.")
}

pub const STOPPED: &str =
    "⏹ Stopped the reply being written. Messages still queued will be answered.";
pub const NOTHING_TO_STOP: &str = "Nothing is being written right now.";
pub const NOT_ADMIN: &str = "⛔ Only an admin of this bot may restart the gateway.";

pub fn refused(user: &str) -> String {
    format!(
        "⛔ This bot is private and you ({user}) are not on its list. Ask its operator for access."
    )
}

pub fn pairing(code: &str) -> String {
    format!(
        "🔐 This bot is private. Your pairing code is {code}.\nAsk its operator to run: hermes-gateway pairing approve {code}"
    )
}

/// A message the agent cannot be given (`what`: "a voice message").
pub fn unsupported(what: &str) -> String {
    format!("I can only read text: {what} is not something I can pass on. Please write it out.")
}

pub const APPROVED: &str = "✅ The operator approved you: say hello!";

pub fn queue_full(waiting: usize) -> String {
    format!(
        "⏳ I'm still working on {waiting} earlier messages here, so this one was not taken. Send it again once I've answered."
    )
}

pub const FLOODED: &str =
    "🐢 That's a lot of messages at once: I'm not taking new ones from this chat for a moment.";

pub fn restarted(took: Duration) -> String {
    format!(
        "✅ The gateway restarted; it took {:.1} s.",
        took.as_secs_f64()
    )
}

/// `/status`: the conversation, its queue and the gateway.
pub fn status(session: &str, running: bool, waiting: usize, uptime: Duration) -> String {
    let work = match (running, waiting) {
        (false, _) => "idle".to_owned(),
        (true, 0) => "writing a reply".to_owned(),
        (true, n) => format!("writing a reply, {n} more waiting"),
    };
    let up = uptime.as_secs();
    format!(
        "Conversation: {session}\nNow: {work}\nGateway: hermes-gateway {}, up {}h {}m {}s",
        env!("CARGO_PKG_VERSION"),
        up / 3600,
        up / 60 % 60,
        up % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_with_arguments_and_case() {
        assert_eq!(parse("/new", false), Some(Command::New));
        assert_eq!(parse("/RESET please", false), Some(Command::New));
        assert_eq!(parse("  /stop", false), Some(Command::Stop));
        assert_eq!(parse("/status", false), Some(Command::Status));
        assert_eq!(parse("/restart", false), Some(Command::Restart));
        assert_eq!(parse("/unknown", false), None);
        assert_eq!(parse("stop", false), None);
        assert_eq!(parse("hello /stop", false), None);
        // Plain words where a platform has no slash commands; a sentence is a message.
        assert_eq!(parse("stop", true), Some(Command::Stop));
        assert_eq!(parse("stop the music", true), None);
    }

    #[test]
    fn status_names_the_session_and_the_queue() {
        let s = status("telegram:main:42", true, 2, Duration::from_secs(3725));
        assert!(s.contains("telegram:main:42"));
        assert!(s.contains("2 more waiting"));
        assert!(s.contains("up 1h 2m 5s"));
        assert!(status("x", false, 0, Duration::ZERO).contains("idle"));
    }
}
