//! `GET /health`: the cheapest possible proof that the gateway answers.

use crate::gateway::scrape::RouteExt;
use axum::Json;
use axum::Router;
use axum::routing::get;
use serde_json::{Value, json};

pub fn router() -> Router {
    Router::new().route_tagged("/health", get(health))
}

async fn health() -> Json<Value> {
    Json(json!({
        "status": "ok",
        "pid": std::process::id(),
        "version": env!("CARGO_PKG_VERSION"),
    }))
}
