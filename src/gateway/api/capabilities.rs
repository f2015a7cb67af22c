//! `GET /v1/capabilities` (what this gateway serves, in the upstream hermes API server's
//! shape, so that its clients accept it) and `GET /health/detailed` (each part ok, or why
//! not). Both are authenticated like every `/v1` route.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde_json::{Value, json};

use super::Shared;
use crate::lifecycle::State as LifecycleState;

pub async fn capabilities(State(s): State<Shared>) -> Json<Value> {
    let auth_required = s.live(|l| !l.keys.is_empty());
    // Tool progress comes from an upstream hermes API server, through `openai` only.
    let tool_progress = s.sessions.agent_kind() == "openai";
    let ep = |method: &str, path: &str| json!({"method": method, "path": path});
    Json(json!({
        "object": "hermes.api_server.capabilities",
        "platform": "hermes-agent",
        "model": s.model(),
        "auth": {"type": "bearer", "required": auth_required},
        "gateway": {"name": "hermes-gateway", "version": env!("CARGO_PKG_VERSION")},
        "features": {
            "chat_completions": true,
            "chat_completions_streaming": true,
            "responses_api": true,
            "responses_streaming": true,
            "run_submission": true,
            "run_status": true,
            "run_events_sse": true,
            "run_stop": true,
            "run_approval_response": false,
            "tool_progress_events": tool_progress,
            "approval_events": false,
            "session_resources": false,
            "session_chat": false,
            "session_chat_streaming": false,
            "session_fork": false,
            "admin_config_rw": false,
            "jobs_admin": false,
            "memory_write_api": false,
            "skills_api": false,
            "audio_api": false,
            "realtime_voice": false,
            "session_continuity_header": "X-Hermes-Session-Id",
            "session_key_header": "X-Hermes-Session-Key",
            "cors": false,
        },
        "endpoints": {
            "health": ep("GET", "/health"),
            "health_detailed": ep("GET", "/health/detailed"),
            "models": ep("GET", "/v1/models"),
            "capabilities": ep("GET", "/v1/capabilities"),
            "chat_completions": ep("POST", "/v1/chat/completions"),
            "responses": ep("POST", "/v1/responses"),
            "response": ep("GET", "/v1/responses/{response_id}"),
            "response_delete": ep("DELETE", "/v1/responses/{response_id}"),
            "response_input_items": ep("GET", "/v1/responses/{response_id}/input_items"),
            "runs": ep("POST", "/v1/runs"),
            "run_status": ep("GET", "/v1/runs/{run_id}"),
            "run_events": ep("GET", "/v1/runs/{run_id}/events"),
            "run_stop": ep("POST", "/v1/runs/{run_id}/stop"),
            "run_cancel": ep("POST", "/v1/runs/{run_id}/cancel"),
            "sessions": ep("GET", "/v1/sessions"),
            "session": ep("GET", "/v1/sessions/{session_id}"),
            "session_delete": ep("DELETE", "/v1/sessions/{session_id}"),
            "deliveries": ep("GET", "/v1/deliveries"),
            "delivery_retry": ep("POST", "/v1/deliveries/{delivery_id}/retry"),
        },
    }))
}

fn part(r: Result<(), String>) -> Value {
    match r {
        Ok(()) => json!({"status": "ok"}),
        Err(e) => json!({"status": "error", "error": e}),
    }
}

/// 200 when every part is ok, 503 (same body) when one is not.
pub async fn health_detailed(State(s): State<Shared>) -> Response {
    let store = s
        .sessions
        .store()
        .read(|c| {
            c.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
                r.get::<_, i64>(0)
            })
        })
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    // Reads may work while commits fail: degraded until a commit succeeds again.
    let degraded = s.sessions.store().degraded();
    let store_ok = store.is_ok() && degraded.is_none();
    let mut store_part = match (store, degraded) {
        (Ok(()), Some(why)) => json!({"status": "degraded", "error": why}),
        (r, _) => part(r),
    };
    store_part["path"] = Value::from(s.sessions.store().path().display().to_string());
    let agent = s.sessions.agent_check().await;
    let agent_ok = agent.is_ok();
    let mut agent_part = part(agent);
    agent_part["backend"] = Value::from(s.sessions.agent_kind());
    agent_part["model"] = Value::from(s.model());
    let report = s.lifecycle.report();
    let serving = matches!(
        report.state,
        LifecycleState::Serving | LifecycleState::Reloading
    );
    let listeners: Vec<Value> = report
        .listeners
        .iter()
        .map(|l| {
            let mut v = part(if serving {
                Ok(())
            } else {
                Err(format!("the gateway is {:?}", report.state).to_lowercase())
            });
            v["name"] = Value::from(l.name.as_str());
            v["address"] = Value::from(l.address.as_str());
            v["origin"] = serde_json::to_value(l.origin).unwrap_or(Value::Null);
            v
        })
        .collect();
    let ok = store_ok && agent_ok && serving;
    let body = json!({
        "status": if ok { "ok" } else { "degraded" },
        "platform": "hermes-agent",
        "version": env!("CARGO_PKG_VERSION"),
        "pid": report.pid,
        "uptime_secs": report.uptime_secs,
        "gateway_state": report.state,
        "store": store_part,
        "agent": agent_part,
        // Each chat platform, ok or why not. A platform's trouble (its API down, a token
        // revoked) does not make the gateway unhealthy: the API and the other platforms
        // serve on, and its messages wait in the ledger.
        "platforms": s.platforms.health().await,
        "listeners": listeners,
        "sessions": s.sessions.summary(),
    });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}
