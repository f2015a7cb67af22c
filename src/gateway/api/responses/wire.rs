//! The Responses API's response objects and stream events, written straight into bytes.
//!
//! A streamed response sends its response object three times and nine events in all;
//! serde's derived code (a map serializer per flattened event, every key escaped at run
//! time) was a fifth of a streamed response's instructions. Here the keys are literals,
//! a string without anything to escape is copied as it is, and the rest goes through
//! `serde_json`, so the output is the JSON `serde_json` would write.

use std::ops::Range;

use serde_json::Value;

/// Appends `s` as a JSON string.
pub(super) fn put_str(b: &mut Vec<u8>, s: &str) {
    // No early exit: the compiler turns this into a few vector instructions per 16 bytes.
    let plain = !s.bytes().fold(false, |any, c| {
        any | (c < 0x20) | (c == b'"') | (c == b'\\')
    });
    if plain {
        b.reserve(s.len() + 2);
        b.push(b'"');
        b.extend_from_slice(s.as_bytes());
        b.push(b'"');
    } else if serde_json::to_writer(&mut *b, s).is_err() {
        // Writing into a Vec cannot fail; keep the JSON whole if it ever did.
        b.extend_from_slice(b"\"\"");
    }
}

fn put_opt_str(b: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => put_str(b, s),
        None => b.extend_from_slice(b"null"),
    }
}

fn put_u64(b: &mut Vec<u8>, n: u64) {
    let _ = serde_json::to_writer(&mut *b, &n);
}

fn put_i64(b: &mut Vec<u8>, n: i64) {
    let _ = serde_json::to_writer(&mut *b, &n);
}

fn put_value(b: &mut Vec<u8>, v: Option<&Value>) {
    match v {
        Some(v) if serde_json::to_writer(&mut *b, v).is_ok() => {}
        _ => b.extend_from_slice(b"null"),
    }
}

/// Token counts as the Responses API names them.
#[derive(serde::Serialize, Clone, Copy)]
pub(super) struct UsageOut {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub total_tokens: u64,
}

/// A string written as JSON once (quoted and escaped), to be repeated as it is: a
/// response's text goes out four times in the closing events.
pub(super) struct JsonStr(Vec<u8>);

impl JsonStr {
    pub(super) fn new(s: &str) -> JsonStr {
        let mut b = Vec::with_capacity(s.len() + 2);
        put_str(&mut b, s);
        JsonStr(b)
    }
}

/// The one text part of a message item.
pub(super) struct Part<'a> {
    pub text: &'a JsonStr,
}

impl Part<'_> {
    fn write(&self, b: &mut Vec<u8>) {
        b.extend_from_slice(br#"{"type":"output_text","text":"#);
        b.extend_from_slice(&self.text.0);
        b.extend_from_slice(br#","annotations":[]}"#);
    }
}

/// The assistant's message item of a response.
pub(super) struct OutputMessage<'a> {
    pub id: &'a str,
    pub status: &'a str,
    /// `None`: no content yet (`[]`).
    pub content: Option<&'a Part<'a>>,
}

impl OutputMessage<'_> {
    fn write(&self, b: &mut Vec<u8>) {
        b.extend_from_slice(br#"{"id":"#);
        put_str(b, self.id);
        b.extend_from_slice(br#","type":"message","status":"#);
        put_str(b, self.status);
        b.extend_from_slice(br#","role":"assistant","content":["#);
        if let Some(p) = self.content {
            p.write(b);
        }
        b.extend_from_slice(b"]}");
    }
}

/// A response object, borrowed from what makes it.
pub(super) struct View<'a> {
    pub id: &'a str,
    pub created_at: i64,
    pub status: &'a str,
    pub model: &'a str,
    /// `None`: no output yet (`[]`).
    pub output: Option<OutputMessage<'a>>,
    pub usage: Option<UsageOut>,
    pub previous_response_id: Option<&'a str>,
    pub conversation: Option<&'a str>,
    pub instructions: Option<&'a str>,
    /// `None`: `{}`.
    pub metadata: Option<&'a Value>,
    pub store: bool,
    pub error: Option<&'a Value>,
}

impl View<'_> {
    pub(super) fn write(&self, b: &mut Vec<u8>) {
        b.extend_from_slice(br#"{"id":"#);
        put_str(b, self.id);
        b.extend_from_slice(br#","object":"response","created_at":"#);
        put_i64(b, self.created_at);
        b.extend_from_slice(br#","status":"#);
        put_str(b, self.status);
        b.extend_from_slice(br#","model":"#);
        put_str(b, self.model);
        b.extend_from_slice(br#","output":["#);
        if let Some(m) = &self.output {
            m.write(b);
        }
        b.extend_from_slice(br#"],"usage":"#);
        match self.usage {
            Some(u) => {
                b.extend_from_slice(br#"{"input_tokens":"#);
                put_u64(b, u.input_tokens);
                b.extend_from_slice(br#","output_tokens":"#);
                put_u64(b, u.output_tokens);
                b.extend_from_slice(br#","total_tokens":"#);
                put_u64(b, u.total_tokens);
                b.push(b'}');
            }
            None => b.extend_from_slice(b"null"),
        }
        b.extend_from_slice(br#","previous_response_id":"#);
        put_opt_str(b, self.previous_response_id);
        b.extend_from_slice(br#","conversation":"#);
        match self.conversation {
            Some(c) => {
                b.extend_from_slice(br#"{"id":"#);
                put_str(b, c);
                b.push(b'}');
            }
            None => b.extend_from_slice(b"null"),
        }
        b.extend_from_slice(br#","instructions":"#);
        put_opt_str(b, self.instructions);
        b.extend_from_slice(br#","metadata":"#);
        match self.metadata {
            Some(m) => put_value(b, Some(m)),
            None => b.extend_from_slice(b"{}"),
        }
        b.extend_from_slice(if self.store {
            br#","store":true,"error":"#
        } else {
            br#","store":false,"error":"#
        });
        put_value(b, self.error);
        b.extend_from_slice(
            br#","incomplete_details":null,"parallel_tool_calls":false,"tool_choice":"none","tools":[],"text":{"format":{"type":"text"}},"truncation":"disabled"}"#,
        );
    }

    pub(super) fn to_vec(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(768);
        self.write(&mut b);
        b
    }
}

const BUF: usize = 4096;

/// Numbers the events of one stream and writes them (`event:` and `data:` lines), several
/// into one buffer when they go out together. A response has one message item
/// (`output_index` 0) with one text part (`content_index` 0).
pub(super) struct Events {
    seq: u64,
    buf: Vec<u8>,
}

impl Events {
    pub(super) fn new() -> Events {
        Events {
            seq: 0,
            buf: Vec::with_capacity(BUF),
        }
    }

    /// `event: KIND`, then `data: {"type":"KIND","sequence_number":N` (the caller adds the
    /// rest and calls `end`). Kinds are this module's callers' literals: nothing in them
    /// needs escaping.
    fn begin(&mut self, kind: &'static str) {
        let b = &mut self.buf;
        b.extend_from_slice(b"event: ");
        b.extend_from_slice(kind.as_bytes());
        b.extend_from_slice(b"\ndata: {\"type\":\"");
        b.extend_from_slice(kind.as_bytes());
        b.extend_from_slice(br#"","sequence_number":"#);
        put_u64(b, self.seq);
    }

    fn end(&mut self) {
        self.buf.extend_from_slice(b"}\n\n");
        self.seq += 1;
    }

    /// An event carrying a response object; returns where the object's bytes are, for
    /// `response_again`.
    pub(super) fn response(&mut self, kind: &'static str, view: &View<'_>) -> Range<usize> {
        self.begin(kind);
        self.buf.extend_from_slice(br#","response":"#);
        let start = self.buf.len();
        view.write(&mut self.buf);
        let written = start..self.buf.len();
        self.end();
        written
    }

    /// An event carrying the response object an earlier event of this buffer carried.
    pub(super) fn response_again(&mut self, kind: &'static str, view: Range<usize>) {
        self.begin(kind);
        self.buf.extend_from_slice(br#","response":"#);
        self.buf.extend_from_within(view);
        self.end();
    }

    pub(super) fn item(&mut self, kind: &'static str, item: &OutputMessage<'_>) {
        self.begin(kind);
        self.buf.extend_from_slice(br#","output_index":0,"item":"#);
        item.write(&mut self.buf);
        self.end();
    }

    /// `,"item_id":ID,"output_index":0,"content_index":0,"KEY":` — what the part and text
    /// events start with.
    fn in_part(&mut self, item_id: &str, key: &[u8]) {
        self.buf.extend_from_slice(br#","item_id":"#);
        put_str(&mut self.buf, item_id);
        self.buf
            .extend_from_slice(br#","output_index":0,"content_index":0,""#);
        self.buf.extend_from_slice(key);
        self.buf.extend_from_slice(b"\":");
    }

    pub(super) fn part(&mut self, kind: &'static str, item_id: &str, part: &Part<'_>) {
        self.begin(kind);
        self.in_part(item_id, b"part");
        part.write(&mut self.buf);
        self.end();
    }

    /// `response.output_text.delta`.
    pub(super) fn delta(&mut self, item_id: &str, delta: &str) {
        self.begin("response.output_text.delta");
        self.in_part(item_id, b"delta");
        put_str(&mut self.buf, delta);
        self.end();
    }

    /// `response.output_text.done`.
    pub(super) fn text_done(&mut self, item_id: &str, text: &JsonStr) {
        self.begin("response.output_text.done");
        self.in_part(item_id, b"text");
        self.buf.extend_from_slice(&text.0);
        self.end();
    }

    /// The stream's `error` event.
    pub(super) fn error(&mut self, code: &str, message: &str) {
        self.begin("error");
        self.buf.extend_from_slice(br#","code":"#);
        put_str(&mut self.buf, code);
        self.buf.extend_from_slice(br#","message":"#);
        put_str(&mut self.buf, message);
        self.buf.extend_from_slice(br#","param":null"#);
        self.end();
    }

    /// What was written since the last `take`. The next buffer starts at the size of an
    /// opening or closing piece, so that writing one does not grow it step by step.
    pub(super) fn take(&mut self) -> Vec<u8> {
        std::mem::replace(&mut self.buf, Vec::with_capacity(BUF))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(b: &[u8]) -> Value {
        match serde_json::from_slice(b) {
            Ok(v) => v,
            Err(e) => panic!("not JSON ({e}): {}", String::from_utf8_lossy(b)),
        }
    }

    const AWKWARD: &str =
        "quote \" backslash \\ newline \n tab \t nul \u{0} bell \u{7} del \u{7f} é 😀 </script>";

    #[test]
    fn strings_come_back_as_they_went_in() {
        for s in ["", "plain", AWKWARD, "\u{1f}", "\"", "\\"] {
            let mut b = Vec::new();
            put_str(&mut b, s);
            assert_eq!(parse(&b), Value::from(s), "{s:?}");
            assert_eq!(b, serde_json::to_vec(s).unwrap(), "as serde_json writes it");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_string_is_written_as_serde_json_writes_it(s in "\\PC*|[\\x00-\\x7f]*") {
            let mut b = Vec::new();
            put_str(&mut b, &s);
            proptest::prop_assert_eq!(b, serde_json::to_vec(&s).unwrap());
        }
    }

    #[test]
    fn a_completed_response_object_has_every_field_openai_defines() {
        let text = JsonStr::new(AWKWARD);
        let part = Part { text: &text };
        let metadata = json!({"k": "v"});
        let v = View {
            id: "resp_1",
            created_at: 1_700_000_000,
            status: "completed",
            model: "hermes-agent",
            output: Some(OutputMessage {
                id: "msg_1",
                status: "completed",
                content: Some(&part),
            }),
            usage: Some(UsageOut {
                input_tokens: 3,
                output_tokens: 4,
                total_tokens: 7,
            }),
            previous_response_id: Some("resp_0"),
            conversation: Some("conv \"x\""),
            instructions: Some("be brief\n"),
            metadata: Some(&metadata),
            store: true,
            error: None,
        };
        assert_eq!(
            parse(&v.to_vec()),
            json!({
                "id": "resp_1", "object": "response", "created_at": 1_700_000_000,
                "status": "completed", "model": "hermes-agent",
                "output": [{"id": "msg_1", "type": "message", "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": AWKWARD, "annotations": []}]}],
                "usage": {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7},
                "previous_response_id": "resp_0", "conversation": {"id": "conv \"x\""},
                "instructions": "be brief\n", "metadata": {"k": "v"}, "store": true,
                "error": null, "incomplete_details": null, "parallel_tool_calls": false,
                "tool_choice": "none", "tools": [], "text": {"format": {"type": "text"}},
                "truncation": "disabled",
            })
        );
    }

    #[test]
    fn a_pending_or_failed_response_has_empty_output_and_nulls() {
        let error = json!({"code": "agent_error", "message": "no"});
        let v = View {
            id: "resp_2",
            created_at: 5,
            status: "failed",
            model: "m",
            output: None,
            usage: None,
            previous_response_id: None,
            conversation: None,
            instructions: None,
            metadata: None,
            store: false,
            error: Some(&error),
        };
        let got = parse(&v.to_vec());
        assert_eq!(got["output"], json!([]));
        assert_eq!(got["metadata"], json!({}));
        assert_eq!(got["error"], error);
        assert_eq!(got["store"], json!(false));
        for k in [
            "usage",
            "previous_response_id",
            "conversation",
            "instructions",
        ] {
            assert_eq!(got[k], Value::Null, "{k}");
        }
    }

    #[test]
    fn events_are_numbered_sse_frames_of_json() {
        let mut ev = Events::new();
        let text = JsonStr::new("hi\n");
        let part = Part { text: &text };
        let v = View {
            id: "resp_1",
            created_at: 1,
            status: "in_progress",
            model: "m",
            output: None,
            usage: None,
            previous_response_id: None,
            conversation: None,
            instructions: None,
            metadata: None,
            store: true,
            error: None,
        };
        let at = ev.response("response.created", &v);
        ev.response_again("response.in_progress", at);
        ev.item(
            "response.output_item.added",
            &OutputMessage {
                id: "msg_1",
                status: "in_progress",
                content: None,
            },
        );
        ev.part("response.content_part.done", "msg_1", &part);
        ev.delta("msg_1", "a\"b");
        ev.text_done("msg_1", &JsonStr::new("ab"));
        ev.error("gateway_restarting", "back soon");
        let out = String::from_utf8(ev.take()).unwrap();
        let frames: Vec<&str> = out.split_terminator("\n\n").collect();
        assert_eq!(frames.len(), 7);
        let mut datas = Vec::new();
        for (n, f) in frames.iter().enumerate() {
            let (event, data) = f.split_once('\n').unwrap();
            let kind = event.strip_prefix("event: ").unwrap();
            let data = parse(data.strip_prefix("data: ").unwrap().as_bytes());
            assert_eq!(data["type"], kind);
            assert_eq!(data["sequence_number"], n as u64);
            datas.push(data);
        }
        assert_eq!(datas[0]["response"], parse(&v.to_vec()));
        assert_eq!(datas[0]["response"]["id"], "resp_1");
        assert_eq!(datas[1]["response"], datas[0]["response"]);
        datas.remove(1);
        assert_eq!(
            datas[1]["item"],
            json!({"id": "msg_1", "type": "message", "status": "in_progress",
                "role": "assistant", "content": []})
        );
        assert_eq!(datas[1]["output_index"], 0);
        assert_eq!(
            datas[2]["part"],
            json!({"type": "output_text", "text": "hi\n", "annotations": []})
        );
        assert_eq!(datas[2]["content_index"], 0);
        assert_eq!(datas[3]["delta"], "a\"b");
        assert!(datas[3].get("text").is_none());
        assert_eq!(datas[4]["text"], "ab");
        assert!(datas[4].get("delta").is_none());
        assert_eq!(
            datas[5],
            json!({"type": "error", "sequence_number": 6, "code": "gateway_restarting",
                "message": "back soon", "param": null})
        );
        assert!(ev.take().is_empty(), "taken");
        ev.error("x", "y");
        assert_eq!(
            parse(
                ev.take()
                    .strip_prefix(b"event: error\ndata: ")
                    .unwrap()
                    .trim_ascii_end()
            )["sequence_number"],
            7
        );
    }
}
