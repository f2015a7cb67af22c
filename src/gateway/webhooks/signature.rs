//! Signature schemes, each verified in constant time over the raw body: GitHub's
//! `X-Hub-Signature-256`, Standard Webhooks (`webhook-id`/`-timestamp`/`-signature`) and a
//! shared token. Also signs the gateway's own deliveries the Standard Webhooks way, so a
//! receiver can verify them with any of that specification's libraries.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use http::HeaderMap;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Why a delivery's proof of origin was refused (all 401). The text names the reason and
/// never the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing {0} header")]
    Missing(&'static str),
    #[error("malformed {0} header")]
    Malformed(&'static str),
    #[error("signature does not match")]
    Mismatch,
    #[error(
        "stale timestamp: webhook-timestamp is {0}s away from the gateway's clock, outside the replay window of {1}s"
    )]
    Stale(i64, u64),
}

impl SignatureError {
    pub fn code(&self) -> &'static str {
        match self {
            SignatureError::Missing(_) => "missing_signature",
            SignatureError::Malformed(_) | SignatureError::Mismatch => "invalid_signature",
            SignatureError::Stale(..) => "stale_timestamp",
        }
    }
}

fn mac(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length: new_from_slice cannot fail.
    match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts any key length"),
    }
}

fn header<'a>(h: &'a HeaderMap, name: &'static str) -> Result<&'a str, SignatureError> {
    h.get(name)
        .ok_or(SignatureError::Missing(name))?
        .to_str()
        .map_err(|_| SignatureError::Malformed(name))
}

/// GitHub: `X-Hub-Signature-256: sha256=<hex of HMAC-SHA256(secret, body)>`.
pub fn verify_github(
    secret: &[u8],
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), SignatureError> {
    const H: &str = "x-hub-signature-256";
    let v = header(headers, H)?;
    let hex = v
        .trim()
        .strip_prefix("sha256=")
        .ok_or(SignatureError::Malformed(H))?;
    let given = decode_hex(hex).ok_or(SignatureError::Malformed(H))?;
    let mut m = mac(secret);
    m.update(body);
    m.verify_slice(&given).map_err(|_| SignatureError::Mismatch)
}

pub fn sign_github(secret: &[u8], body: &[u8]) -> String {
    let mut m = mac(secret);
    m.update(body);
    format!("sha256={}", encode_hex(&m.finalize().into_bytes()))
}

/// Slack: `X-Slack-Signature: v0=<hex of HMAC-SHA256(signing secret, "v0:" + timestamp +
/// ":" + body)>`, the timestamp from `X-Slack-Request-Timestamp`, which must be within
/// `window_secs` of `now` (Slack says five minutes).
pub fn verify_slack(
    secret: &[u8],
    headers: &HeaderMap,
    body: &[u8],
    now: i64,
    window_secs: u64,
) -> Result<(), SignatureError> {
    const TS: &str = "x-slack-request-timestamp";
    const SIG: &str = "x-slack-signature";
    let ts_text = header(headers, TS)?.trim();
    let sig = header(headers, SIG)?;
    let ts: i64 = ts_text.parse().map_err(|_| SignatureError::Malformed(TS))?;
    let hex = sig
        .trim()
        .strip_prefix("v0=")
        .ok_or(SignatureError::Malformed(SIG))?;
    let given = decode_hex(hex).ok_or(SignatureError::Malformed(SIG))?;
    let mut m = mac(secret);
    m.update(b"v0:");
    m.update(ts_text.as_bytes());
    m.update(b":");
    m.update(body);
    m.verify_slice(&given)
        .map_err(|_| SignatureError::Mismatch)?;
    let skew = now.saturating_sub(ts);
    if skew.unsigned_abs() > window_secs {
        return Err(SignatureError::Stale(skew, window_secs));
    }
    Ok(())
}

/// The key of a Standard Webhooks secret: the base64 after `whsec_`. A secret without the
/// prefix is used as raw bytes (as Svix's libraries do for other secrets).
pub fn standard_key(secret: &str) -> Vec<u8> {
    match secret.strip_prefix("whsec_") {
        Some(b) => B64.decode(b).unwrap_or_else(|_| secret.as_bytes().to_vec()),
        None => secret.as_bytes().to_vec(),
    }
}

/// Standard Webhooks: HMAC-SHA256 over `{id}.{timestamp}.{body}`, `webhook-signature` a
/// space-separated list of `v1,<base64>` (any one matching suffices); the timestamp must
/// be within `window_secs` of `now`.
pub fn verify_standard(
    key: &[u8],
    headers: &HeaderMap,
    body: &[u8],
    now: i64,
    window_secs: u64,
) -> Result<(), SignatureError> {
    const ID: &str = "webhook-id";
    const TS: &str = "webhook-timestamp";
    const SIG: &str = "webhook-signature";
    let id = header(headers, ID)?;
    let ts_text = header(headers, TS)?;
    let sigs = header(headers, SIG)?;
    let ts: i64 = ts_text
        .trim()
        .parse()
        .map_err(|_| SignatureError::Malformed(TS))?;
    let mut any = false;
    let mut ok = false;
    for s in sigs.split_whitespace() {
        let Some(b) = s.strip_prefix("v1,") else {
            continue; // other versions (v1a: asymmetric) are not ours to check
        };
        any = true;
        let Ok(given) = B64.decode(b) else { continue };
        let mut m = mac(key);
        m.update(id.as_bytes());
        m.update(b".");
        m.update(ts_text.as_bytes());
        m.update(b".");
        m.update(body);
        ok |= m.verify_slice(&given).is_ok();
    }
    if !any {
        return Err(SignatureError::Malformed(SIG));
    }
    if !ok {
        return Err(SignatureError::Mismatch);
    }
    // Checked after the signature, so that the reason given is only about authentic deliveries.
    let skew = now.saturating_sub(ts);
    if skew.unsigned_abs() > window_secs {
        return Err(SignatureError::Stale(skew, window_secs));
    }
    Ok(())
}

/// `v1,<base64>` for `{id}.{timestamp}.{body}`.
pub fn sign_standard(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut m = mac(key);
    m.update(format!("{id}.{timestamp}.").as_bytes());
    m.update(body);
    format!("v1,{}", B64.encode(m.finalize().into_bytes()))
}

/// A shared token in `name`, compared in constant time (both sides through one HMAC, so
/// neither the content nor the length leaks through timing).
pub fn verify_token(secret: &[u8], name: &str, headers: &HeaderMap) -> Result<(), SignatureError> {
    let given = headers
        .get(name)
        .ok_or(SignatureError::Missing("token"))?
        .as_bytes();
    let mut a = mac(b"hermes-gateway token comparison");
    a.update(given);
    let mut b = mac(b"hermes-gateway token comparison");
    b.update(secret);
    a.verify_slice(&b.finalize().into_bytes())
        .map_err(|_| SignatureError::Mismatch)
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn encode_hex(b: &[u8]) -> String {
    use std::fmt::Write;
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    // GitHub's documentation ("Validating webhook deliveries"), its test values.
    const GH_SECRET: &[u8] = b"It's a Secret to Everybody";
    const GH_BODY: &[u8] = b"Hello, World!";
    const GH_SIG: &str = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

    #[test]
    fn github_documentation_vector() {
        assert_eq!(sign_github(GH_SECRET, GH_BODY), GH_SIG);
        let h = headers(&[("x-hub-signature-256", GH_SIG)]);
        assert_eq!(verify_github(GH_SECRET, &h, GH_BODY), Ok(()));
    }

    #[test]
    fn github_wrong_secret_wrong_body_missing_malformed() {
        let h = headers(&[("x-hub-signature-256", GH_SIG)]);
        assert_eq!(
            verify_github(b"It's a Secret to Everybody!", &h, GH_BODY),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_github(GH_SECRET, &h, b"Hello, World?"),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_github(GH_SECRET, &HeaderMap::new(), GH_BODY),
            Err(SignatureError::Missing("x-hub-signature-256"))
        );
        let bad = headers(&[("x-hub-signature-256", "sha1=abcd")]);
        assert!(matches!(
            verify_github(GH_SECRET, &bad, GH_BODY),
            Err(SignatureError::Malformed(_))
        ));
        let odd = headers(&[("x-hub-signature-256", "sha256=abc")]);
        assert!(matches!(
            verify_github(GH_SECRET, &odd, GH_BODY),
            Err(SignatureError::Malformed(_))
        ));
    }

    // Slack's documentation ("Verifying requests from Slack"), its example values.
    const SLACK_SECRET: &[u8] = b"8f742231b10e8888abcd99yyyzzz85a5";
    const SLACK_TS: &str = "1531420618";
    const SLACK_BODY: &[u8] = b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
    const SLACK_SIG: &str = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";

    #[test]
    fn slack_documentation_vector_and_refusals() {
        let h = headers(&[
            ("x-slack-request-timestamp", SLACK_TS),
            ("x-slack-signature", SLACK_SIG),
        ]);
        let now = 1531420618 + 60;
        assert_eq!(verify_slack(SLACK_SECRET, &h, SLACK_BODY, now, 300), Ok(()));
        assert_eq!(
            verify_slack(b"another-secret", &h, SLACK_BODY, now, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_slack(SLACK_SECRET, &h, b"token=tampered", now, 300),
            Err(SignatureError::Mismatch)
        );
        // A replay: authentic, but older than five minutes.
        assert_eq!(
            verify_slack(SLACK_SECRET, &h, SLACK_BODY, 1531420618 + 301, 300),
            Err(SignatureError::Stale(301, 300))
        );
        // The timestamp is part of what is signed.
        let moved = headers(&[
            ("x-slack-request-timestamp", "1531420619"),
            ("x-slack-signature", SLACK_SIG),
        ]);
        assert_eq!(
            verify_slack(SLACK_SECRET, &moved, SLACK_BODY, now, 300),
            Err(SignatureError::Mismatch)
        );
        let missing = headers(&[("x-slack-signature", SLACK_SIG)]);
        assert_eq!(
            verify_slack(SLACK_SECRET, &missing, SLACK_BODY, now, 300),
            Err(SignatureError::Missing("x-slack-request-timestamp"))
        );
        let v1 = headers(&[
            ("x-slack-request-timestamp", SLACK_TS),
            ("x-slack-signature", "v1=abcd"),
        ]);
        assert_eq!(
            verify_slack(SLACK_SECRET, &v1, SLACK_BODY, now, 300),
            Err(SignatureError::Malformed("x-slack-signature"))
        );
    }

    // The Standard Webhooks specification's test vector.
    const SW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SW_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SW_TS: i64 = 1614265330;
    const SW_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SW_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn sw_headers(id: &str, ts: &str, sig: &str) -> HeaderMap {
        headers(&[
            ("webhook-id", id),
            ("webhook-timestamp", ts),
            ("webhook-signature", sig),
        ])
    }

    #[test]
    fn standard_webhooks_specification_vector() {
        let key = standard_key(SW_SECRET);
        assert_eq!(sign_standard(&key, SW_ID, SW_TS, SW_BODY), SW_SIG);
        let h = sw_headers(SW_ID, "1614265330", SW_SIG);
        assert_eq!(verify_standard(&key, &h, SW_BODY, SW_TS, 300), Ok(()));
        // Several signatures (a key rotation): one match suffices, unknown versions skipped.
        let several = format!("v1a,AAAA v1,Zm9vYmFy {SW_SIG}");
        let h = sw_headers(SW_ID, "1614265330", &several);
        assert_eq!(verify_standard(&key, &h, SW_BODY, SW_TS + 10, 300), Ok(()));
    }

    #[test]
    fn standard_webhooks_refusals() {
        let key = standard_key(SW_SECRET);
        let ok = sw_headers(SW_ID, "1614265330", SW_SIG);
        // Wrong secret.
        let other = standard_key("whsec_c2VjcmV0LW9mLWFub3RoZXItZW5kcG9pbnQ=");
        assert_eq!(
            verify_standard(&other, &ok, SW_BODY, SW_TS, 300),
            Err(SignatureError::Mismatch)
        );
        // Wrong body.
        assert_eq!(
            verify_standard(&key, &ok, br#"{"test": 2432232315}"#, SW_TS, 300),
            Err(SignatureError::Mismatch)
        );
        // Tampered timestamp (signed with the original one).
        let h = sw_headers(SW_ID, "1614265331", SW_SIG);
        assert_eq!(
            verify_standard(&key, &h, SW_BODY, SW_TS, 300),
            Err(SignatureError::Mismatch)
        );
        // Tampered id.
        let h = sw_headers("msg_other", "1614265330", SW_SIG);
        assert_eq!(
            verify_standard(&key, &h, SW_BODY, SW_TS, 300),
            Err(SignatureError::Mismatch)
        );
        // Replay outside the window, in either direction.
        assert_eq!(
            verify_standard(&key, &ok, SW_BODY, SW_TS + 301, 300),
            Err(SignatureError::Stale(301, 300))
        );
        assert_eq!(
            verify_standard(&key, &ok, SW_BODY, SW_TS - 301, 300),
            Err(SignatureError::Stale(-301, 300))
        );
        assert_eq!(
            verify_standard(&key, &ok, SW_BODY, SW_TS + 300, 300),
            Ok(())
        );
        // Missing and malformed headers.
        let h = headers(&[("webhook-id", SW_ID), ("webhook-signature", SW_SIG)]);
        assert_eq!(
            verify_standard(&key, &h, SW_BODY, SW_TS, 300),
            Err(SignatureError::Missing("webhook-timestamp"))
        );
        let h = sw_headers(SW_ID, "yesterday", SW_SIG);
        assert_eq!(
            verify_standard(&key, &h, SW_BODY, SW_TS, 300),
            Err(SignatureError::Malformed("webhook-timestamp"))
        );
        let h = sw_headers(SW_ID, "1614265330", "v2,abc");
        assert_eq!(
            verify_standard(&key, &h, SW_BODY, SW_TS, 300),
            Err(SignatureError::Malformed("webhook-signature"))
        );
    }

    #[test]
    fn token_compares_whole_values() {
        let h = headers(&[("x-gitlab-token", "s3cret")]);
        assert_eq!(verify_token(b"s3cret", "x-gitlab-token", &h), Ok(()));
        assert_eq!(
            verify_token(b"s3cret!", "x-gitlab-token", &h),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_token(b"s3cre", "x-gitlab-token", &h),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_token(b"s3cret", "x-other", &h),
            Err(SignatureError::Missing("token"))
        );
    }
}
