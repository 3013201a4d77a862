//! The admin HTTP API (`--admin-listen ADDR`), with axum: health and readiness,
//! node statistics, cluster-wide client and node lists, server-originated
//! broadcasts, disconnecting a client anywhere in the cluster, and draining
//! the node. JSON in and out; documented in README.md ("Admin API").
//!
//! Every endpoint but `/health` and `/ready` requires
//! `Authorization: Bearer TOKEN` when `--admin-token` is set (it must be
//! when the API listens beyond loopback).

use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::bus::ClusterBus;
use crate::node::{Kick, Node};
use crate::protocol::json::client_json;
use crate::protocol::{ClientId, Payload, Priority};
use crate::stats::get as counter;

/// Most clients returned in one page of `GET /clients`.
pub const MAX_PAGE: usize = 1000;

/// Longest operator-supplied reason or broadcast text accepted, in bytes.
const MAX_REASON_BYTES: usize = 256;

/// The admin API's routes over `node`.
pub fn router(node: Arc<Node>) -> Router {
    let protected = Router::new()
        .route("/stats", get(stats))
        .route("/clients", get(clients))
        .route("/clients/{id}", delete(kick))
        .route("/nodes", get(nodes))
        .route("/broadcast", post(broadcast))
        .route("/drain", post(drain))
        .route_layer(middleware::from_fn_with_state(node.clone(), require_token));
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .merge(protected)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(node)
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, Json(json!({ "error": message.to_string() }))).into_response()
}

async fn require_token(State(node): State<Arc<Node>>, request: Request, next: Next) -> Response {
    let Some(expected) = &node.config().admin_token else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(token) if constant_time_eq(token.as_bytes(), expected.as_bytes()) => {
            next.run(request).await
        }
        _ => {
            let mut response = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            response
        }
    }
}

/// Compares without an early exit, so timing does not reveal the prefix
/// that matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn health(State(node): State<Arc<Node>>) -> Json<Value> {
    Json(json!({ "status": "ok", "node_id": node.id().to_string() }))
}

async fn ready(State(node): State<Arc<Node>>) -> Response {
    match node.not_ready() {
        None => Json(json!({ "ready": true })).into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "reason": reason })),
        )
            .into_response(),
    }
}

async fn stats(State(node): State<Arc<Node>>) -> Json<Value> {
    let s = node.stats();
    let bus = node.bus();
    Json(json!({
        "node_id": node.id().to_string(),
        "name": node.config().name,
        "uptime_ms": s.uptime().as_millis() as u64,
        "clients_connected": node.registry().len(),
        "handshakes_pending": node.admission().pending(),
        "connections_total": counter(&s.connections_total),
        "connections_refused": s.refused_before_tls(),
        "messages_in": s.messages_in(),
        "messages_out": s.messages_out(),
        "bytes_in": counter(&s.bytes_in),
        "bytes_out": counter(&s.bytes_out),
        "errors": s.errors(),
        "slow_consumer_disconnects": counter(&s.slow_consumer_disconnects),
        "rate_limited": counter(&s.rate_limited),
        "auth_failures": s.refused_count(crate::stats::RefusedReason::AuthFailed),
        "outbound_queue_bytes": node.queue_budget().used(),
        "draining": node.draining(),
        "clustered": bus.clustered(),
        "redis_up": bus.clustered().then(|| bus.available()),
    }))
}

#[derive(Debug, Deserialize)]
struct Page {
    #[serde(default)]
    offset: usize,
    limit: Option<usize>,
}

async fn clients(State(node): State<Arc<Node>>, Query(page): Query<Page>) -> Response {
    let limit = page.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return error(
            StatusCode::BAD_REQUEST,
            format!("limit must be 1..={MAX_PAGE}"),
        );
    }
    let Some(end) = page.offset.checked_add(limit) else {
        return error(StatusCode::BAD_REQUEST, "offset too large");
    };
    match node.list_clients(end).await {
        Ok((all, more)) => {
            let page_clients: Vec<Value> = all.iter().skip(page.offset).map(client_json).collect();
            Json(json!({
                "clients": page_clients,
                "offset": page.offset,
                "limit": limit,
                "next_offset": more.then_some(end),
            }))
            .into_response()
        }
        Err(err) => error(StatusCode::SERVICE_UNAVAILABLE, err),
    }
}

async fn nodes(State(node): State<Arc<Node>>) -> Response {
    match node.nodes().await {
        Ok(nodes) => {
            let nodes: Vec<Value> = nodes
                .iter()
                .map(|(id, clients)| {
                    json!({
                        "node_id": id.to_string(),
                        "clients": clients,
                        "self": *id == node.id(),
                    })
                })
                .collect();
            Json(json!({ "nodes": nodes })).into_response()
        }
        Err(err) => error(StatusCode::SERVICE_UNAVAILABLE, err),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BroadcastRequest {
    text: Option<String>,
    binary_base64: Option<String>,
    #[serde(default)]
    priority: Option<String>,
}

async fn broadcast(
    State(node): State<Arc<Node>>,
    body: Result<Json<BroadcastRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(request) = match body {
        Ok(body) => body,
        Err(rejection) => return error(StatusCode::BAD_REQUEST, rejection.body_text()),
    };
    let priority = match request.priority.as_deref().map(str::parse::<Priority>) {
        None => Priority::Normal,
        Some(Ok(p)) => p,
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, e),
    };
    let payload = match (request.text, request.binary_base64) {
        (Some(text), None) => Payload::Text(text),
        (None, Some(data)) => {
            use base64::Engine;
            match base64::engine::general_purpose::STANDARD.decode(data) {
                Ok(bytes) => Payload::Binary(bytes),
                Err(e) => return error(StatusCode::BAD_REQUEST, format!("binary_base64: {e}")),
            }
        }
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "give exactly one of text and binary_base64",
            );
        }
    };
    if payload.len() > node.config().max_message_bytes {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "payload above max_message_bytes ({})",
                node.config().max_message_bytes
            ),
        );
    }
    match node.server_broadcast(priority, payload).await {
        Ok((id, local)) => Json(json!({
            "id": id.to_string(),
            "local_clients": local,
            "cluster": node.bus().clustered(),
        }))
        .into_response(),
        Err((id, local, err)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "id": id.to_string(),
                "local_clients": local,
                "error": crate::router::broadcast_shortfall(local, &err),
            })),
        )
            .into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct KickQuery {
    reason: Option<String>,
}

async fn kick(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
    Query(query): Query<KickQuery>,
) -> Response {
    let Ok(id) = id.parse::<ClientId>() else {
        return error(StatusCode::BAD_REQUEST, "not a client id (uuid)");
    };
    let reason = query
        .reason
        .unwrap_or_else(|| "disconnected by an operator".into());
    if reason.len() > MAX_REASON_BYTES || reason.chars().any(char::is_control) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("reason must be at most {MAX_REASON_BYTES} bytes without control characters"),
        );
    }
    match node.kick(id, &reason).await {
        Ok(Kick::Local) => Json(json!({
            "client_id": id.to_string(),
            "node_id": node.id().to_string(),
            "status": "disconnecting",
        }))
        .into_response(),
        Ok(Kick::Remote(node)) => (
            StatusCode::ACCEPTED,
            Json(json!({
                "client_id": id.to_string(),
                "node_id": node.to_string(),
                "status": "requested",
            })),
        )
            .into_response(),
        Ok(Kick::Unknown) => error(
            StatusCode::NOT_FOUND,
            format!("no client {id} is connected"),
        ),
        Err(err) => error(StatusCode::SERVICE_UNAVAILABLE, err),
    }
}

async fn drain(State(node): State<Arc<Node>>) -> Response {
    let already = node.draining();
    node.start_drain();
    (
        StatusCode::ACCEPTED,
        Json(json!({
            "draining": true,
            "already_draining": already,
            "clients": node.registry().len(),
            "grace_ms": node.config().shutdown_grace.as_millis() as u64,
        })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
