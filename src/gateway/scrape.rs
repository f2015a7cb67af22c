//! `GET /metrics` (the control socket, and the `metrics` listener when there is one), and
//! the route tag that labels each request's metrics with its route template.

use std::convert::Infallible;
use std::task::{Context, Poll};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use http::{HeaderMap, Request, StatusCode, header};
use tower::{Layer, Service};

use super::deliveries::DeliveryLedger;
use super::platforms::Platforms;
use super::sessions::Sessions;
use crate::metrics;

/// What the scrape reads besides the counters: the sessions' queue, the ledger and the
/// platforms' state.
#[derive(Clone)]
pub struct Sources {
    pub sessions: Sessions,
    pub ledger: DeliveryLedger,
    pub platforms: Platforms,
}

/// `GET /metrics`, for the control socket's router or the `metrics` listener.
pub fn router(sources: Sources) -> Router {
    Router::new()
        .route_tagged("/metrics", get(scrape))
        .with_state(sources)
}

/// Whether the client asked for OpenMetrics (Prometheus does, in its `Accept`).
fn wants_openmetrics(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

async fn scrape(State(s): State<Sources>, headers: HeaderMap) -> Response {
    s.sessions.export_metrics();
    s.ledger.export_metrics().await;
    s.platforms.export_metrics().await;
    let om = wants_openmetrics(&headers);
    match metrics::encode(om) {
        Ok(text) => ([(header::CONTENT_TYPE, metrics::content_type(om))], text).into_response(),
        Err(_) => super::ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "the metrics could not be encoded",
        )
        .into_response(),
    }
}

/// `Router::route`, with the route's template as its requests' `route` label.
pub trait RouteExt<S> {
    fn route_tagged(self, path: &str, method_router: MethodRouter<S>) -> Self;
}

impl<S: Clone + Send + Sync + 'static> RouteExt<S> for Router<S> {
    fn route_tagged(self, path: &str, method_router: MethodRouter<S>) -> Self {
        let tag = RouteTag(metrics::http::intern(path));
        self.route(path, method_router.layer(tag))
    }
}

/// Puts the route's template in its responses' extensions, for the connection's metrics.
#[derive(Clone, Copy)]
struct RouteTag(&'static str);

impl<I> Layer<I> for RouteTag {
    type Service = Tagged<I>;
    fn layer(&self, inner: I) -> Tagged<I> {
        Tagged {
            inner,
            route: self.0,
        }
    }
}

#[derive(Clone)]
pub struct Tagged<I> {
    inner: I,
    route: &'static str,
}

impl<I> Service<Request<Body>> for Tagged<I>
where
    I: Service<Request<Body>, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = TaggedFuture<I::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        TaggedFuture {
            inner: self.inner.call(req),
            route: self.route,
        }
    }
}

pin_project_lite::pin_project! {
    pub struct TaggedFuture<F> {
        #[pin]
        inner: F,
        route: &'static str,
    }
}

impl<F: std::future::Future<Output = Result<Response, Infallible>>> std::future::Future
    for TaggedFuture<F>
{
    type Output = Result<Response, Infallible>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let route = *this.route;
        this.inner.poll(cx).map(|r| {
            r.map(|mut resp| {
                resp.extensions_mut()
                    .insert(metrics::http::RouteLabel(route));
                resp
            })
        })
    }
}
