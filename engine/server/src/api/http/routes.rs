//! The routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
//! `GET /health`, `GET /metrics`; a 404 (or 405) in OpenAI's error shape for anything else.
//!
//! Authentication (when a key is set) covers every route except `/health`: a load balancer
//! probes without credentials. The key is compared in constant time.

use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::api::http::body::{parse_off_io, read_body};
use crate::api::http::errors::{json_response, ApiError};
use crate::api::http::generate::{complete, stream, submit, Meta};
use crate::api::http::openai::{parse_request, Endpoint};
use crate::api::http::{App, ConnId};
use crate::api::metrics::{self, Snapshot};

/// The API listener's routes.
pub(crate) fn api_router(app: App) -> Router {
    let limit = app.http.cfg.max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics_route))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(app.clone(), auth))
        .with_state(app)
}

/// The `--metrics` listener's routes.
pub(crate) fn metrics_router(app: App) -> Router {
    Router::new()
        .route("/metrics", get(metrics_route))
        .route("/health", get(health))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(64 * 1024))
        .layer(axum::middleware::from_fn_with_state(app.clone(), auth))
        .with_state(app)
}

/// What a connection over the limit gets, whatever it asks.
pub(crate) fn busy_router(max: usize) -> Router {
    Router::new().fallback(move || async move {
        let mut r = ApiError::new(
            "too_many_connections",
            format!("the daemon holds {max} HTTP connections"),
        )
        .into_response();
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        r
    })
}

/// Whether `Authorization` carries the key (`Bearer <key>`), compared in constant time.
/// (Only the key's length can leak through timing, as with any comparison of unequal lengths.)
pub(crate) fn authorized(headers: &HeaderMap, key: &[u8]) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return false;
    };
    let value = value.as_bytes();
    let scheme = b"bearer ";
    if value.len() < scheme.len() || !value[..scheme.len()].eq_ignore_ascii_case(scheme) {
        return false;
    }
    let token = value[scheme.len()..].trim_ascii();
    bool::from(token.ct_eq(key))
}

async fn auth(State(app): State<App>, req: Request, next: Next) -> Response {
    if let Some(key) = &app.http.key {
        if req.uri().path() != "/health" {
            if !req.headers().contains_key(header::AUTHORIZATION) {
                return ApiError::new(
                    "missing_api_key",
                    "this server needs an API key: send Authorization: Bearer <key>",
                )
                .into_response();
            }
            if !authorized(req.headers(), key.as_bytes()) {
                return ApiError::new("invalid_api_key", "incorrect API key provided")
                    .into_response();
            }
        }
    }
    next.run(req).await
}

async fn not_found(req: Request) -> Response {
    ApiError::new(
        "not_found",
        format!("no route {} {}", req.method(), req.uri().path()),
    )
    .into_response()
}

async fn method_not_allowed(req: Request) -> Response {
    ApiError::new(
        "method_not_allowed",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
    .into_response()
}

async fn health(State(app): State<App>) -> Response {
    if app.shared.draining.load(Ordering::Relaxed) {
        return ApiError::new("shutting_down", "the daemon is draining").into_response();
    }
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

async fn models(State(app): State<App>) -> Response {
    json_response(
        StatusCode::OK,
        &json!({
            "object": "list",
            "data": [{
                "id": app.http.cfg.model_name,
                "object": "model",
                "created": app.http.created,
                "owned_by": "convoy",
                "max_model_len": app.shared.cfg.max_context,
            }],
        }),
    )
}

async fn metrics_route(State(app): State<App>, headers: HeaderMap) -> Response {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let asked = app.shared.engine.stats_with(Box::new(move |s| {
        let _ = tx.send(s);
    }));
    let stats = match (asked, rx.await) {
        (Ok(()), Ok(s)) => s,
        _ => return ApiError::new("engine_error", "the engine has stopped").into_response(),
    };
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    let snapshot = Snapshot {
        stats,
        connections: app.shared.connections.load(Ordering::Relaxed)
            + app.http.connections.load(Ordering::Relaxed),
    };
    let text = metrics::render(
        &app.shared.latencies.metrics,
        snapshot,
        &app.http.cfg.model_name,
        openmetrics,
    );
    let content_type = if openmetrics {
        metrics::OPENMETRICS_CONTENT_TYPE
    } else {
        metrics::PROMETHEUS_CONTENT_TYPE
    };
    ([(header::CONTENT_TYPE, content_type)], text).into_response()
}

async fn chat_completions(
    State(app): State<App>,
    conn: Option<Extension<ConnId>>,
    req: Request,
) -> Response {
    generate(app, Endpoint::Chat, conn.map_or(0, |c| c.0 .0), req).await
}

async fn completions(
    State(app): State<App>,
    conn: Option<Extension<ConnId>>,
    req: Request,
) -> Response {
    generate(app, Endpoint::Completions, conn.map_or(0, |c| c.0 .0), req).await
}

/// The fair-queuing owner: one per `user` when given, else one per HTTP connection; both
/// apart from the socket's connection numbers.
fn owner(user: Option<&str>, conn: u64) -> u64 {
    match user {
        Some(u) => {
            let mut h = std::hash::DefaultHasher::new();
            u.hash(&mut h);
            (1 << 62) | (h.finish() >> 2)
        }
        None => (1 << 63) | conn,
    }
}

async fn generate(app: App, endpoint: Endpoint, conn: u64, req: Request) -> Response {
    let (head, body) = req.into_parts();
    let body = match read_body(
        &head.headers,
        body,
        app.http.cfg.max_body_bytes,
        app.http.cfg.body_read_timeout,
        &app.http.bodies,
    )
    .await
    {
        Ok(b) => b,
        Err(e) => {
            // The rest of the body is not read: the connection cannot carry another request.
            let mut r = e.into_response();
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return r;
        }
    };
    // The request is accepted once its body is in: its queueing time and TTFT count from here.
    let accepted = std::time::Instant::now();
    // Without a limit a request runs to the end of the context, as OpenAI's API does.
    let default_max_tokens = app.shared.cfg.max_context as u64;
    let model_name = app.http.cfg.model_name.clone();
    let parsed = match parse_off_io(body, move |body| {
        parse_request(endpoint, body, &model_name, default_max_tokens)
    })
    .await
    {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let sub = match submit(
        &app,
        &parsed.generate,
        owner(parsed.user.as_deref(), conn),
        accepted,
    )
    .await
    {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let n = app.http.next_response.fetch_add(1, Ordering::Relaxed);
    let prefix = match endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completions => "cmpl",
    };
    let meta = Meta {
        endpoint,
        id: format!("{prefix}-{:x}{n:08x}", app.http.id_base),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model: app.http.cfg.model_name.clone(),
        logprobs: parsed.logprobs,
        include_usage: parsed.include_usage,
    };
    if parsed.stream {
        stream(app, sub, meta)
    } else {
        complete(app, sub, meta).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_keys() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            h
        };
        assert!(authorized(&with("Bearer sk-1"), b"sk-1"));
        assert!(authorized(&with("bearer  sk-1 "), b"sk-1"));
        assert!(!authorized(&with("Bearer sk-2"), b"sk-1"));
        assert!(!authorized(&with("Bearer sk-1x"), b"sk-1"));
        assert!(!authorized(&with("Basic sk-1"), b"sk-1"));
        assert!(!authorized(&with("Bearer"), b"sk-1"));
        assert!(!authorized(&HeaderMap::new(), b"sk-1"));
        assert_ne!(owner(Some("a"), 1), owner(Some("b"), 1));
        assert_eq!(owner(Some("a"), 1), owner(Some("a"), 2));
        assert_ne!(owner(None, 1), owner(None, 2));
    }
}
