//! The server-sent events of an OpenAI-compatible upstream's streamed chat completion,
//! read as they come in chunks of any size: `data:` lines (several in one event are joined
//! by a newline), `event:` names, `:` comments (keepalives), a blank line ending each
//! event, until `data: [DONE]`; lines end with LF or CRLF. Other fields (`id:`, `retry:`) and lines that are none are
//! ignored, as the SSE specification says.
//!
//! Pure and bounded: a line or an event's data longer than the limit is an error rather
//! than a buffer that grows, and the same bytes give the same items however they are split.

use serde_json::Value;

use super::Usage;

/// Why a stream cannot be read on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("a line of more than {0} bytes")]
    LineTooLong(usize),
    #[error("an event of more than {0} bytes")]
    EventTooLong(usize),
    #[error("a data line that is not a JSON object: `{0}`")]
    NotJson(String),
    /// An `{"error": …}` object in the stream: its message.
    #[error("{0}")]
    Upstream(String),
}

/// What the stream's events carry, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item<'a> {
    /// `choices[0].delta.content` (never empty).
    Text(&'a str),
    /// `choices[0].delta.reasoning_content` (never empty).
    Reasoning(&'a str),
    /// A named event (`event: hermes.tool.progress`) whose data is a JSON object.
    Event {
        name: &'a str,
        data: &'a str,
    },
    Usage(Usage),
    /// `choices[0].finish_reason`, when it is a string.
    Finish(&'a str),
    /// `data: [DONE]`: nothing after it is read.
    Done,
}

/// Reads an upstream's stream chunk by chunk.
#[derive(Debug)]
pub struct SseParser {
    /// The start of a line whose end has not come yet.
    pending: Vec<u8>,
    /// The current event's name, data, and whether it has a data line.
    event: Option<String>,
    data: String,
    has_data: bool,
    max: usize,
    done: bool,
    finished: bool,
}

impl SseParser {
    /// A parser that refuses a line, or an event's data, longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        SseParser {
            pending: Vec::new(),
            event: None,
            data: String::new(),
            has_data: false,
            max,
            done: false,
            finished: false,
        }
    }

    /// Whether `[DONE]` came.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Whether the stream said its reply is whole: `[DONE]`, or a `finish_reason`.
    pub fn is_complete(&self) -> bool {
        self.done || self.finished
    }

    /// Reads the next bytes, handing `on` what each event that they end carries. Once
    /// `[DONE]` came, the rest is ignored.
    pub fn feed(&mut self, bytes: &[u8], on: &mut dyn FnMut(Item<'_>)) -> Result<(), StreamError> {
        if self.done {
            return Ok(());
        }
        let mut rest = bytes;
        if !self.pending.is_empty() {
            let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
                self.pending.extend_from_slice(rest);
                return self.check_pending();
            };
            self.pending.extend_from_slice(&rest[..nl]);
            rest = &rest[nl + 1..];
            let mut line = std::mem::take(&mut self.pending);
            let r = self.line(&line, on);
            line.clear();
            self.pending = line;
            r?;
        }
        while !self.done {
            let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
                self.pending.extend_from_slice(rest);
                return self.check_pending();
            };
            self.line(&rest[..nl], on)?;
            rest = &rest[nl + 1..];
        }
        Ok(())
    }

    /// The end of the stream: a last line without its newline, and an event without its
    /// blank line, are read as if they had them.
    pub fn finish(&mut self, on: &mut dyn FnMut(Item<'_>)) -> Result<(), StreamError> {
        if self.done {
            return Ok(());
        }
        if !self.pending.is_empty() {
            let line = std::mem::take(&mut self.pending);
            self.line(&line, on)?;
        }
        if !self.done {
            self.dispatch(on)?;
        }
        Ok(())
    }

    fn check_pending(&self) -> Result<(), StreamError> {
        if self.pending.len() > self.max {
            return Err(StreamError::LineTooLong(self.max));
        }
        Ok(())
    }

    fn line(&mut self, raw: &[u8], on: &mut dyn FnMut(Item<'_>)) -> Result<(), StreamError> {
        if raw.len() > self.max {
            return Err(StreamError::LineTooLong(self.max));
        }
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.is_empty() {
            return self.dispatch(on);
        }
        if raw[0] == b':' {
            return Ok(()); // a comment: a keepalive
        }
        let text = String::from_utf8_lossy(raw);
        let (field, value) = match text.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (&*text, ""),
        };
        match field {
            "event" => self.event = Some(value.to_owned()),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
                if self.data.len() > self.max {
                    return Err(StreamError::EventTooLong(self.max));
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The end of an event: what its data carries.
    fn dispatch(&mut self, on: &mut dyn FnMut(Item<'_>)) -> Result<(), StreamError> {
        let name = self.event.take();
        if !std::mem::take(&mut self.has_data) {
            return Ok(());
        }
        let mut data = std::mem::take(&mut self.data);
        let r = match name.as_deref().map(str::trim) {
            Some(n) if !n.is_empty() && n != "message" => {
                // Only a well-formed JSON object under a printable name goes on: it is
                // written into the client's stream. A carriage return there could only be
                // whitespace between tokens, and would end a line for the client.
                if !n.chars().any(char::is_control)
                    && serde_json::from_str::<Value>(&data).is_ok_and(|v| v.is_object())
                {
                    if data.contains('\r') {
                        let d = data.replace('\r', " ");
                        on(Item::Event { name: n, data: &d });
                    } else {
                        on(Item::Event {
                            name: n,
                            data: &data,
                        });
                    }
                }
                Ok(())
            }
            _ => self.chunk(&data, on),
        };
        data.clear();
        self.data = data;
        r
    }

    /// A `chat.completion.chunk`, `[DONE]`, or an error object.
    fn chunk(&mut self, data: &str, on: &mut dyn FnMut(Item<'_>)) -> Result<(), StreamError> {
        let data = data.trim();
        if data.is_empty() {
            return Ok(());
        }
        if data == "[DONE]" {
            self.done = true;
            on(Item::Done);
            return Ok(());
        }
        let v = match serde_json::from_str::<Value>(data) {
            Ok(v @ Value::Object(_)) => v,
            _ => return Err(StreamError::NotJson(excerpt(data, 200))),
        };
        if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
            let message = e
                .get("message")
                .and_then(Value::as_str)
                .map_or_else(|| e.to_string(), str::to_owned);
            return Err(StreamError::Upstream(excerpt(&message, 500)));
        }
        if let Some(u) = usage(&v) {
            on(Item::Usage(u));
        }
        let Some(choice) = v.pointer("/choices/0") else {
            return Ok(());
        };
        if let Some(d) = choice
            .pointer("/delta/reasoning_content")
            .and_then(Value::as_str)
            .filter(|d| !d.is_empty())
        {
            on(Item::Reasoning(d));
        }
        if let Some(d) = choice
            .pointer("/delta/content")
            .and_then(Value::as_str)
            .filter(|d| !d.is_empty())
        {
            on(Item::Text(d));
        }
        if let Some(f) = choice.get("finish_reason").and_then(Value::as_str) {
            self.finished = true;
            on(Item::Finish(f));
        }
        Ok(())
    }
}

/// `usage` of a completion or chunk, when it has one.
pub fn usage(v: &Value) -> Option<Usage> {
    let u = v.get("usage")?;
    let n = |k: &str| u.get(k).and_then(Value::as_u64);
    let (p, c) = (n("prompt_tokens")?, n("completion_tokens")?);
    Some(Usage {
        prompt_tokens: p,
        completion_tokens: c,
        total_tokens: n("total_tokens").unwrap_or(p.saturating_add(c)),
    })
}

/// At most `max` characters of `text`, with `…` when it goes on.
pub fn excerpt(text: &str, max: usize) -> String {
    let mut chars = text.chars();
    let mut out: String = chars.by_ref().take(max).collect();
    if chars.next().is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(chunks: &[&[u8]]) -> (Vec<String>, Result<bool, StreamError>) {
        let mut p = SseParser::new(1024);
        let mut out = Vec::new();
        let mut on = |i: Item<'_>| out.push(format!("{i:?}"));
        for c in chunks {
            if let Err(e) = p.feed(c, &mut on) {
                return (out, Err(e));
            }
        }
        let r = p.finish(&mut on).map(|()| p.is_complete());
        (out, r)
    }

    #[test]
    fn events_split_anywhere_read_the_same() {
        let s: &[u8] = b": ping\r\ndata: {\"choices\":[{\"delta\":{\"content\":\"h\xc3\xa9\"}}]}\r\n\r\nevent: hermes.tool.progress\ndata: {\"a\":\ndata: 1}\n\nid: 7\ndata: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\ndata: ignored";
        let whole = items(&[s]);
        assert_eq!(
            whole.0,
            [
                "Text(\"hé\")",
                "Event { name: \"hermes.tool.progress\", data: \"{\\\"a\\\":\\n1}\" }",
                "Finish(\"stop\")",
                "Done"
            ]
        );
        assert_eq!(whole.1, Ok(true));
        for at in 0..s.len() {
            assert_eq!(items(&[&s[..at], &s[at..]]), whole, "split at {at}");
        }
        let bytes: Vec<&[u8]> = s.chunks(1).collect();
        assert_eq!(items(&bytes), whole);
    }

    #[test]
    fn what_is_not_a_stream_is_an_error() {
        assert_eq!(
            items(&[b"data: {not json\n\n"]).1,
            Err(StreamError::NotJson("{not json".into()))
        );
        assert_eq!(
            items(&[b"data: {\"error\":{\"message\":\"boom\"}}\n\n"]).1,
            Err(StreamError::Upstream("boom".into()))
        );
        assert_eq!(
            items(&[b"hello\nworld\n\n"]).1,
            Ok(false),
            "ignored, not complete"
        );
        assert_eq!(
            items(&[&[b'x'; 1000][..], &[b'x'; 100][..]]).1,
            Err(StreamError::LineTooLong(1024))
        );
        let many = "data: 0123456789\n".repeat(200);
        assert_eq!(
            items(&[many.as_bytes()]).1,
            Err(StreamError::EventTooLong(1024))
        );
    }
}
