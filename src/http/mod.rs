//! The HTTP server, separate from the data path: liveness, readiness, Prometheus metrics
//! and the node's signed public description.
//!
//! | route | answers |
//! |---|---|
//! | `GET /livez` | 200 while the accept loop and the forwarder run; 503 otherwise |
//! | `GET /readyz` | 200 when keys, topology and listeners are in place and the node is not draining; 503 with a JSON reason otherwise |
//! | `GET /metrics` | Prometheus text exposition, to holders of the bearer token (`NYM_NODE_METRICS_TOKEN`); 401 to all without one unless `NYM_NODE_METRICS_PUBLIC` |
//! | `GET /api/v1/description` | the signed description |
//! | `GET /api/v1/build-information` | version, commit, compiler |
//! | `GET /api/v1/openapi.json` | the OpenAPI document of these routes |

pub mod description;
mod openapi;
pub mod probe;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use serde_json::json;
use tokio::net::TcpListener;

use crate::health::Health;
use crate::metrics::Metrics;
use description::SignedDescription;

/// Produces the current signed description (it follows the topology: layer, addresses).
pub type Describe = Arc<dyn Fn() -> SignedDescription + Send + Sync>;

pub struct HttpState {
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    pub describe: Describe,
    pub metrics_access: MetricsAccess,
}

/// Who may read `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAccess {
    /// Whoever presents this bearer token.
    Token(String),
    /// Anyone (`NYM_NODE_METRICS_PUBLIC=true` without a token).
    Public,
    /// No one: no token is configured.
    Closed,
}

/// Build facts served at `/api/v1/build-information`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct BuildInformation {
    pub binary_name: String,
    pub version: String,
    pub commit: String,
    pub rustc: String,
    pub profile: String,
}

impl BuildInformation {
    pub fn current() -> Self {
        BuildInformation {
            binary_name: "nym-node".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            commit: crate::BUILD_COMMIT.into(),
            rustc: env!("NYM_BUILD_RUSTC").into(),
            profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
            .into(),
        }
    }
}

pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/description", get(description))
        .route("/api/v1/build-information", get(build_information))
        .route("/api/v1/openapi.json", get(openapi_json))
        .with_state(state)
}

/// Serves until `stop` resolves.
pub async fn serve(
    listener: TcpListener,
    state: Arc<HttpState>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(stop)
        .await
}

async fn livez(State(s): State<Arc<HttpState>>) -> Response {
    match s.health.liveness() {
        Ok(()) => (StatusCode::OK, axum::Json(json!({"status": "ok"}))).into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "failing", "reason": why.as_str()})),
        )
            .into_response(),
    }
}

async fn readyz(State(s): State<Arc<HttpState>>) -> Response {
    match s.health.readiness() {
        Ok(()) => (StatusCode::OK, axum::Json(json!({"status": "ready"}))).into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "not ready", "reason": why.as_str()})),
        )
            .into_response(),
    }
}

/// Compares in constant time so the token cannot be guessed byte by byte.
fn token_matches(headers: &HeaderMap, expected: &str) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn metrics(State(s): State<Arc<HttpState>>, headers: HeaderMap) -> Response {
    let refusal = match &s.metrics_access {
        MetricsAccess::Token(token) if !token_matches(&headers, token) => {
            Some("missing or wrong bearer token\n")
        }
        MetricsAccess::Closed => Some(
            "metrics need a bearer token: the node has none (set NYM_NODE_METRICS_TOKEN or NYM_NODE_METRICS_TOKEN_FILE, or NYM_NODE_METRICS_PUBLIC=true)\n",
        ),
        _ => None,
    };
    if let Some(message) = refusal {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            message,
        )
            .into_response();
    }
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn description(State(s): State<Arc<HttpState>>) -> Response {
    axum::Json((s.describe)()).into_response()
}

async fn build_information() -> Response {
    axum::Json(BuildInformation::current()).into_response()
}

async fn openapi_json() -> Response {
    axum::Json(openapi::document()).into_response()
}
