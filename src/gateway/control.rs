//! The control socket: local administration over HTTP on a Unix socket.
//! `curl --unix-socket /run/hermes-gateway/control.sock http://localhost/status`

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::routing::get;

use crate::lifecycle::{LifecycleHandle, StatusReport};

pub fn router(lifecycle: LifecycleHandle) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/health", get(status))
        .with_state(lifecycle)
}

async fn status(State(l): State<LifecycleHandle>) -> Json<StatusReport> {
    Json(l.report())
}
