//! One HTTP exchange with a platform's API, on the gateway's hyper client: the request
//! sent, the answer read (at most [`MAX_ANSWER`]) within a timeout. What the answer means
//! is the platform's client's business; errors here are all worth another attempt.

use std::time::Duration;

use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

use crate::gateway::http_client::Client;

/// Of an answer this much is read at most (platforms answer a send in a few hundred bytes).
pub const MAX_ANSWER: usize = 1 << 20;

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON (`Null` when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// `Retry-After` in seconds, if the platform sent one (clamped to 1 s … 1 h).
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

/// Sends `req` and reads the answer. `shown` names the call in errors (never a secret:
/// platforms that put a token in the URL pass a redacted one).
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
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| format!("{shown}: answer cut short: {e}"))?
            .to_bytes();
        Ok(Answer {
            status,
            headers,
            body,
        })
    };
    tokio::time::timeout(timeout, answer)
        .await
        .map_err(|_| format!("no answer from {shown} within {timeout:?}"))?
}
