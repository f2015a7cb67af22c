//! One request to a platform's API on the gateway's hyper client, as the platforms that
//! are not Telegram make them: a deadline over the whole exchange, a bounded answer, and
//! errors that say which URL (never a header: credentials travel there).

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

use crate::gateway::http_client::Client;

/// Of an answer this much is read at most (the platforms' answers are a few hundred bytes).
const MAX_ANSWER: usize = 1 << 20;

/// An answer: its status, headers and body.
pub struct Answer {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// `Retry-After` in seconds, if the platform sent one (capped at an hour).
    pub fn retry_after(&self) -> Option<Duration> {
        let secs: u64 = self
            .headers
            .get(http::header::RETRY_AFTER)?
            .to_str()
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Some(Duration::from_secs(secs.clamp(1, 3600)))
    }
}

/// Sends `req`; `Err` (a message naming `shown`) when no whole answer came within
/// `timeout`. Any status is an `Ok`: the caller judges it.
pub async fn exchange(
    client: &Client,
    req: http::Request<Full<Bytes>>,
    shown: &str,
    timeout: Duration,
) -> Result<Answer, String> {
    let answer = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| format!("cannot reach {shown}: {e}"))?;
        let (parts, body) = resp.into_parts();
        let body = http_body_util::Limited::new(body, MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| format!("{shown}: answer cut short: {e}"))?
            .to_bytes();
        Ok::<_, String>(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    };
    tokio::time::timeout(timeout, answer)
        .await
        .map_err(|_| format!("no answer from {shown} within {timeout:?}"))?
}
