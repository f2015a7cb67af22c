//! `POST /webhooks/{route}` on the `webhook` listener: where a signed delivery becomes a
//! stored delivery (and, through the ledger, a run). Every refusal is a short JSON error
//! logged with the `route` and `delivery_id` fields; none is a panic.
//!
//! Order of checks: route (404), rate (429), body size (413), signature and timestamp
//! (401), template (422), then the commit; 202 only once that commit is on disk.

pub mod signature;
pub mod template;

use crate::gateway::scrape::RouteExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http::{HeaderMap, HeaderValue, StatusCode};
use serde_json::{Value, json};

use super::deliveries::{Acceptance, DeliveryLedger, NewDelivery, Target};
use super::error::{STORE_RETRY_AFTER, STORE_UNAVAILABLE, retry_after};
use super::ids::new_id;
use super::rate::TokenBucket;
use crate::config::{RouteConfig, Secret, SignatureScheme, TargetConfig, Template, WebhookConfig};
use template::{Input, render};

/// One route, with its secrets read.
struct Route {
    cfg: RouteConfig,
    /// The scheme's key: the secret's bytes (whsec_ decoded for standard-webhooks).
    key: Option<Vec<u8>>,
    target: Target,
    bucket: Option<Mutex<TokenBucket>>,
}

impl Route {
    /// `None` when the delivery may pass, else how long until a token is back.
    fn take_token(&self) -> Option<Duration> {
        self.bucket
            .as_ref()?
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take(Instant::now())
    }
}

/// The routes, and the key that signs each route's http deliveries.
pub struct RouteTable {
    routes: HashMap<String, Arc<Route>>,
}

/// Reads every route's secrets; an error names the route and the source, never the value.
pub fn build_routes(
    config: &WebhookConfig,
) -> Result<(RouteTable, HashMap<String, Vec<u8>>), String> {
    let mut routes = HashMap::new();
    let mut signing = HashMap::new();
    for r in &config.routes {
        let secret: Option<Secret> = match &r.secret {
            Some(s) => Some(
                s.read()
                    .map_err(|e| format!("[[webhook.routes]] `{}`: secret: {e}", r.name))?,
            ),
            None => None,
        };
        let key = secret.as_ref().map(|s| match r.scheme {
            SignatureScheme::StandardWebhooks => signature::standard_key(s.expose()),
            _ => s.expose().as_bytes().to_vec(),
        });
        let target = match &r.target {
            TargetConfig::Log => Target::Log,
            TargetConfig::Http { url, secret: own } => {
                let signer = match own {
                    Some(s) => Some(s.read().map_err(|e| {
                        format!("[[webhook.routes]] `{}`: target secret: {e}", r.name)
                    })?),
                    None => secret.clone(),
                };
                if let Some(s) = signer {
                    signing.insert(r.name.clone(), signature::standard_key(s.expose()));
                }
                Target::Http { url: url.clone() }
            }
        };
        let bucket = r.rate_limit.map(|rl| Mutex::new(TokenBucket::new(rl)));
        routes.insert(
            r.name.clone(),
            Arc::new(Route {
                cfg: r.clone(),
                key,
                target,
                bucket,
            }),
        );
    }
    Ok((RouteTable { routes }, signing))
}

struct Limits {
    max_body: u64,
    body_timeout: Duration,
    replay_window: Duration,
    dedup_window: Duration,
}

pub struct Webhooks {
    table: RwLock<Arc<RouteTable>>,
    limits: RwLock<Limits>,
    ledger: DeliveryLedger,
}

pub type Shared = Arc<Webhooks>;

impl Webhooks {
    pub fn new(config: &WebhookConfig, table: RouteTable, ledger: DeliveryLedger) -> Shared {
        Arc::new(Webhooks {
            table: RwLock::new(Arc::new(table)),
            limits: RwLock::new(limits(config)),
            ledger,
        })
    }

    pub fn update(&self, config: &WebhookConfig, table: RouteTable) {
        *self.table.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(table);
        *self.limits.write().unwrap_or_else(PoisonError::into_inner) = limits(config);
    }

    fn route(&self, name: &str) -> Option<Arc<Route>> {
        self.table
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .routes
            .get(name)
            .cloned()
    }
}

fn limits(c: &WebhookConfig) -> Limits {
    Limits {
        max_body: c.max_body,
        body_timeout: c.body_timeout,
        replay_window: c.replay_window,
        dedup_window: c.dedup_window,
    }
}

pub fn router(state: Shared) -> Router {
    Router::new()
        .route_tagged("/webhooks/{route}", post(receive))
        .with_state(state)
}

/// A refusal: logged with the route and the sender's delivery id, answered in short JSON.
/// (A store that cannot commit is logged once per episode by the store; each refusal only
/// at debug level.)
fn refuse(status: StatusCode, code: &str, message: String, route: &str, id: &str) -> Response {
    if code == STORE_UNAVAILABLE {
        tracing::debug!(route = %route, delivery_id = %id, status = status.as_u16(), "webhook refused: {message}");
    } else if status.is_server_error() {
        tracing::error!(route = %route, delivery_id = %id, status = status.as_u16(), "webhook refused: {message}");
    } else {
        tracing::warn!(route = %route, delivery_id = %id, status = status.as_u16(), "webhook refused: {message}");
    }
    (
        status,
        axum::Json(json!({"status": "error", "error": code, "message": message})),
    )
        .into_response()
}

fn header_str<'a>(h: &'a HeaderMap, name: Option<&str>) -> Option<&'a str> {
    h.get(name?)?
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

fn unix_now() -> i64 {
    crate::store::now_ms() / 1000
}

async fn receive(
    State(w): State<Shared>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let name = name.escape_default().to_string();
    let Some(route) = w.route(&name) else {
        return refuse(
            StatusCode::NOT_FOUND,
            "unknown_route",
            format!("no webhook route `{name}`"),
            &name,
            "",
        );
    };
    // The sender's id, for the log only until the signature is checked.
    let claimed = header_str(&headers, route.cfg.id_header.as_deref())
        .map(|s| s.escape_default().to_string())
        .unwrap_or_default();
    if let Some(wait) = route.take_token() {
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        let mut r = refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("route `{name}` is over its rate limit; retry in {secs}s"),
            &name,
            &claimed,
        );
        r.headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        return r;
    }
    let (max_body, body_timeout, replay_window, dedup_window) = {
        let l = w.limits.read().unwrap_or_else(PoisonError::into_inner);
        (
            route.cfg.max_body.unwrap_or(l.max_body),
            l.body_timeout,
            l.replay_window,
            l.dedup_window,
        )
    };
    let body = match read_body(&headers, body, max_body, body_timeout).await {
        Ok(b) => b,
        Err((status, code, msg)) => return refuse(status, code, msg, &name, &claimed),
    };
    if let Some(key) = &route.key {
        let verified = match route.cfg.scheme {
            SignatureScheme::Github => signature::verify_github(key, &headers, &body),
            SignatureScheme::StandardWebhooks => signature::verify_standard(
                key,
                &headers,
                &body,
                unix_now(),
                replay_window.as_secs(),
            ),
            SignatureScheme::Token => signature::verify_token(
                key,
                route.cfg.header.as_deref().unwrap_or_default(),
                &headers,
            ),
        };
        if let Err(e) = verified {
            return refuse(
                StatusCode::UNAUTHORIZED,
                e.code(),
                e.to_string(),
                &name,
                &claimed,
            );
        }
    }
    let source_id = match header_str(&headers, route.cfg.id_header.as_deref()) {
        Some(id) if id.len() <= 200 && id.bytes().all(|b| b.is_ascii_graphic()) => id.to_owned(),
        Some(_) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "invalid_delivery_id",
                "the delivery id header must be 1 to 200 printable ASCII characters".into(),
                &name,
                &claimed,
            );
        }
        // No id from the sender: nothing to deduplicate on.
        None => new_id("src_"),
    };
    let event = header_str(&headers, route.cfg.event_header.as_deref())
        .unwrap_or("")
        .escape_default()
        .to_string();
    let needs_json = route.cfg.template.needs_json()
        || route.cfg.session.as_ref().is_some_and(Template::needs_json);
    let json: Option<Value> = if needs_json {
        match serde_json::from_slice(&body) {
            Ok(v) => Some(v),
            Err(e) => {
                return refuse(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "unusable_body",
                    format!("route `{name}`'s template needs a JSON body: {e}"),
                    &name,
                    &source_id,
                );
            }
        }
    } else {
        None
    };
    let input = Input {
        body: &body,
        json: json.as_ref(),
        event: &event,
        route: &name,
        source_id: &source_id,
    };
    let unusable = |what: &str, e: String| {
        refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unusable_body",
            format!("route `{name}`'s {what} cannot use this body: {e}"),
            &name,
            &source_id,
        )
    };
    let prompt = match render(&route.cfg.template, &input) {
        Ok(p) => p,
        Err(e) => return unusable("template", e),
    };
    let session_id = match &route.cfg.session {
        None => None,
        Some(t) => match render(t, &input) {
            Ok(s) if !s.is_empty() && s.len() <= 256 && s.bytes().all(|b| b.is_ascii_graphic()) => {
                Some(s)
            }
            Ok(s) => {
                return unusable(
                    "session key",
                    format!(
                        "`{}` is not a session id (1 to 256 visible ASCII characters without spaces)",
                        s.escape_default()
                    ),
                );
            }
            Err(e) => return unusable("session key", e),
        },
    };
    let since = crate::store::now_ms() - dedup_window.as_millis() as i64;
    let accepted = w
        .ledger
        .accept(NewDelivery {
            route: name.clone(),
            source_id: source_id.clone(),
            event,
            prompt,
            session_id,
            target: route.target.clone(),
            dedup_since_ms: since,
        })
        .await;
    match accepted {
        Ok(Acceptance::Accepted(id)) => {
            tracing::info!(route = %name, delivery_id = %id, source_id = %source_id, "webhook accepted");
            (
                StatusCode::ACCEPTED,
                axum::Json(
                    json!({"status": "accepted", "delivery_id": id, "source_id": source_id}),
                ),
            )
                .into_response()
        }
        Ok(Acceptance::Duplicate(id)) => {
            tracing::info!(route = %name, delivery_id = %id, source_id = %source_id,
                "webhook repeated within the dedup window: nothing runs");
            (
                StatusCode::OK,
                axum::Json(
                    json!({"status": "duplicate", "delivery_id": id, "source_id": source_id}),
                ),
            )
                .into_response()
        }
        Err(e) => {
            if !e.is_unavailable() {
                tracing::error!(route = %name, delivery_id = %source_id, "webhook: the store failed: {e}");
            }
            let mut r = refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                STORE_UNAVAILABLE,
                format!("the delivery could not be stored ({e}); retry later"),
                &name,
                &source_id,
            );
            retry_after(&mut r, STORE_RETRY_AFTER);
            r
        }
    }
}

async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: u64,
    timeout: Duration,
) -> Result<Bytes, (StatusCode, &'static str, String)> {
    use crate::gateway::body::{BodyError, read_limited};
    read_limited(headers, body, limit, timeout)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the body is larger than {limit} bytes ([webhook] max_body)"),
            ),
            BodyError::Timeout => (
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!("the body did not arrive within {timeout:?}"),
            ),
            BodyError::Unreadable(e) => (
                StatusCode::BAD_REQUEST,
                "unreadable_body",
                format!("cannot read the body: {e}"),
            ),
        })
}
