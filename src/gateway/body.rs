//! Reading a request body with a size limit and a deadline, for every route that takes one.
//! Each caller turns a [`BodyError`] into its own error shape.

use std::time::Duration;

use axum::body::{Body, Bytes};
use http::HeaderMap;
use http_body_util::{BodyExt, LengthLimitError, Limited};

#[derive(Debug)]
pub enum BodyError {
    /// Larger than the limit (said by Content-Length, or found while reading).
    TooLarge,
    /// Not complete within the deadline.
    Timeout,
    /// The connection failed while reading.
    Unreadable(String),
}

/// Reads at most `limit` bytes within `timeout`; a Content-Length over the limit is refused
/// before anything is read.
pub async fn read_limited(
    headers: &HeaderMap,
    body: Body,
    limit: u64,
    timeout: Duration,
) -> Result<Bytes, BodyError> {
    if let Some(len) = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit
    {
        return Err(BodyError::TooLarge);
    }
    let limited = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    match tokio::time::timeout(timeout, limited.collect()).await {
        Err(_) => Err(BodyError::Timeout),
        Ok(Err(e)) if e.is::<LengthLimitError>() => Err(BodyError::TooLarge),
        Ok(Err(e)) => Err(BodyError::Unreadable(e.to_string())),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}
