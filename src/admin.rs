//! The admin HTTP API (`--admin-listen ADDR`), with axum: health and readiness,
//! node statistics, cluster-wide client and node lists, server-originated
//! broadcasts, disconnecting a client anywhere in the cluster, channels
//! (list, presence, server publications, removing a subscriber), and
//! draining the node. JSON in and out; documented in README.md ("Admin API").
//!
//! Channel names travel percent-encoded in one path segment (`chat:room/1`
//! is `chat%3Aroom%2F1`); axum's `Path` hands the handlers the decoded name.
//!
//! Every endpoint but `/health` and `/ready` requires
//! `Authorization: Bearer TOKEN` when `--admin-token` is set (it must be
//! when the API listens beyond loopback).

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::bus::ClusterBus;
use crate::config::Namespace;
use crate::node::{Kick, Node, ServerPublishError, Unsubscribed};
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
        .route("/channels", get(channels))
        .route("/channels/{channel}/presence", get(presence))
        .route("/channels/{channel}/publish", post(publish))
        .route("/channels/{channel}/history", get(history))
        .route(
            "/channels/{channel}/subscribers/{client_id}",
            delete(unsubscribe),
        )
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

async fn clients(
    State(node): State<Arc<Node>>,
    page: Result<Query<Page>, QueryRejection>,
) -> Response {
    let page = match query(page) {
        Ok(page) => page,
        Err(err) => return err.into_response(),
    };
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

/// A request answered with an error: its status, and `{"error": message}`.
#[derive(Debug)]
struct HttpError(StatusCode, String);

impl HttpError {
    fn new(status: StatusCode, message: impl std::fmt::Display) -> Self {
        HttpError(status, message.to_string())
    }

    fn bad(message: impl std::fmt::Display) -> Self {
        HttpError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}

/// Reads a `POST /broadcast` or channel publish body: the payload and its
/// priority; 400 for a bad body, 413 above `max_message_bytes`.
fn message(
    node: &Node,
    body: Result<Json<BroadcastRequest>, JsonRejection>,
) -> Result<(Priority, Payload), HttpError> {
    let Json(request) = body.map_err(|r| HttpError::bad(r.body_text()))?;
    let priority = match request.priority.as_deref().map(str::parse::<Priority>) {
        None => Priority::Normal,
        Some(p) => p.map_err(HttpError::bad)?,
    };
    let payload = match (request.text, request.binary_base64) {
        (Some(text), None) => Payload::Text(text),
        (None, Some(data)) => {
            use base64::Engine;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(data)
                .map_err(|e| HttpError::bad(format!("binary_base64: {e}")))?;
            Payload::Binary(bytes)
        }
        _ => return Err(HttpError::bad("give exactly one of text and binary_base64")),
    };
    let max = node.config().max_message_bytes;
    if payload.len() > max {
        return Err(HttpError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("payload above max_message_bytes ({max})"),
        ));
    }
    Ok((priority, payload))
}

async fn broadcast(
    State(node): State<Arc<Node>>,
    body: Result<Json<BroadcastRequest>, JsonRejection>,
) -> Result<Response, HttpError> {
    let (priority, payload) = message(&node, body)?;
    Ok(match node.server_broadcast(priority, payload).await {
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
    })
}

#[derive(Debug, Deserialize)]
struct ReasonQuery {
    reason: Option<String>,
}

/// The operator's `reason`, or `default`; 400 when it is too long or has
/// control characters (it goes to the client in a frame).
fn reason(given: Option<String>, default: &str) -> Result<String, HttpError> {
    let reason = given.unwrap_or_else(|| default.into());
    if reason.len() > MAX_REASON_BYTES || reason.chars().any(char::is_control) {
        return Err(HttpError::bad(format!(
            "reason must be at most {MAX_REASON_BYTES} bytes without control characters"
        )));
    }
    Ok(reason)
}

fn client_id(id: &str) -> Result<ClientId, HttpError> {
    id.parse()
        .map_err(|_| HttpError::bad("not a client id (uuid)"))
}

async fn kick(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
    given: Result<Query<ReasonQuery>, QueryRejection>,
) -> Result<Response, HttpError> {
    let id = client_id(&id)?;
    let reason = reason(query(given)?.reason, "disconnected by an operator")?;
    Ok(match node.kick(id, &reason).await {
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
    })
}

/// The channel named by the path (axum has percent-decoded it), checked
/// against the channel grammar and the declared namespaces (400
/// otherwise), with its namespace.
fn channel_in<T>(
    node: &Node,
    path: Result<Path<T>, PathRejection>,
    name: impl FnOnce(&T) -> &str,
) -> Result<(T, &Namespace), HttpError> {
    let Path(params) = path.map_err(|r| HttpError::bad(r.body_text()))?;
    let namespace = node
        .channels()
        .namespace(name(&params))
        .map_err(|(_, why)| HttpError::bad(why))?;
    Ok((params, namespace))
}

fn query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, HttpError> {
    query
        .map(|Query(q)| q)
        .map_err(|r| HttpError::bad(r.body_text()))
}

async fn channels(
    State(node): State<Arc<Node>>,
    page: Result<Query<Page>, QueryRejection>,
) -> Result<Response, HttpError> {
    let page = query(page)?;
    let limit = page.limit.unwrap_or(MAX_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(HttpError::bad(format!("limit must be 1..={MAX_PAGE}")));
    }
    let channels = node
        .bus()
        .channels()
        .await
        .map_err(|err| HttpError::new(StatusCode::SERVICE_UNAVAILABLE, err))?;
    let end = page.offset.saturating_add(limit);
    let listed: Vec<Value> = channels
        .iter()
        .skip(page.offset)
        .take(limit)
        .map(|(channel, subscribers)| json!({ "channel": channel, "subscribers": subscribers }))
        .collect();
    Ok(Json(json!({
        "channels": listed,
        "offset": page.offset,
        "limit": limit,
        "next_offset": (channels.len() > end).then_some(end),
    }))
    .into_response())
}

#[derive(Debug, Deserialize)]
struct PresenceQuery {
    limit: Option<usize>,
}

async fn presence(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    limit: Result<Query<PresenceQuery>, QueryRejection>,
) -> Result<Response, HttpError> {
    let (channel, namespace) = channel_in(&node, path, String::as_str)?;
    if !namespace.presence {
        return Err(HttpError::new(
            StatusCode::CONFLICT,
            format!("presence is off for the namespace of {channel}"),
        ));
    }
    let limit = query(limit)?.limit.unwrap_or(MAX_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(HttpError::bad(format!("limit must be 1..={MAX_PAGE}")));
    }
    let (members, truncated) = node
        .bus()
        .channel_members(&channel, limit)
        .await
        .map_err(|err| HttpError::new(StatusCode::SERVICE_UNAVAILABLE, err))?;
    Ok(Json(json!({
        "channel": channel,
        "members": members.iter().map(client_json).collect::<Vec<_>>(),
        "truncated": truncated,
    }))
    .into_response())
}

#[derive(Deserialize)]
struct HistoryQuery {
    limit: Option<usize>,
    before: Option<u64>,
}

async fn history(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    given: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Response, HttpError> {
    let (channel, namespace) = channel_in(&node, path, String::as_str)?;
    let Some(retention) = namespace.retention() else {
        return Err(HttpError::new(
            StatusCode::CONFLICT,
            format!("history is off for the namespace of {channel}"),
        ));
    };
    let given = query(given)?;
    let most = node.config().max_history_page.min(retention.size as usize);
    let limit = given.limit.unwrap_or(most);
    if limit == 0 || limit > most {
        return Err(HttpError::bad(format!("limit must be 1..={most}")));
    }
    let page = node
        .bus()
        .history(
            &channel,
            crate::bus::HistoryRange::Before(given.before),
            limit,
        )
        .await
        .map_err(|err| HttpError::new(StatusCode::SERVICE_UNAVAILABLE, err))?;
    let mut publications = Vec::with_capacity(page.entries.len());
    for entry in &page.entries {
        let bytes = entry.frame.get(crate::protocol::LENGTH_PREFIX_BYTES..);
        match bytes.map(crate::protocol::decode_frame) {
            Some(Ok(frame)) => {
                let mut line = crate::protocol::json::publication_json(&frame);
                line["epoch"] = json!(page.position.epoch_hex());
                line["offset"] = json!(entry.offset);
                publications.push(line);
            }
            _ => {
                tracing::warn!(%channel, offset = entry.offset, "undecodable history entry left out")
            }
        }
    }
    Ok(Json(json!({
        "channel": channel,
        "epoch": page.position.epoch_hex(),
        "offset": page.position.offset,
        "publications": publications,
        "more": page.more,
    }))
    .into_response())
}

async fn publish(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Json<BroadcastRequest>, JsonRejection>,
) -> Result<Response, HttpError> {
    let (channel, _) = channel_in(&node, path, String::as_str)?;
    let (priority, payload) = message(&node, body)?;
    Ok(
        match node.server_publish(&channel, priority, payload).await {
            Ok((id, local)) => Json(json!({
                "id": id.to_string(),
                "local_subscribers": local,
                "cluster": node.bus().clustered(),
            }))
            .into_response(),
            Err(ServerPublishError::Channel(why)) => return Err(HttpError::bad(why)),
            Err(err @ ServerPublishError::Bus { id, local, .. }) => (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({
                    "id": id.to_string(),
                    "local_subscribers": local,
                    "error": err.to_string(),
                })),
            )
                .into_response(),
        },
    )
}

async fn unsubscribe(
    State(node): State<Arc<Node>>,
    path: Result<Path<(String, String)>, PathRejection>,
    given: Result<Query<ReasonQuery>, QueryRejection>,
) -> Result<Response, HttpError> {
    let ((channel, id), _) = channel_in(&node, path, |(channel, _)| channel.as_str())?;
    let id = client_id(&id)?;
    let reason = reason(query(given)?.reason, "unsubscribed by an operator")?;
    let (status, node_id, what) = match node.unsubscribe_client(id, &channel, &reason).await {
        Ok(Unsubscribed::Local) => (StatusCode::OK, node.id(), "unsubscribed"),
        Ok(Unsubscribed::Remote(at)) => (StatusCode::ACCEPTED, at, "requested"),
        Ok(Unsubscribed::NotSubscribed) => {
            return Err(HttpError::new(
                StatusCode::NOT_FOUND,
                format!("client {id} is not subscribed to {channel}"),
            ));
        }
        Ok(Unsubscribed::Unknown) => {
            return Err(HttpError::new(
                StatusCode::NOT_FOUND,
                format!("no client {id} is connected"),
            ));
        }
        Err(err) => return Err(HttpError::new(StatusCode::SERVICE_UNAVAILABLE, err)),
    };
    let answer = json!({
        "client_id": id.to_string(),
        "channel": channel,
        "node_id": node_id.to_string(),
        "status": what,
    });
    Ok((status, Json(answer)).into_response())
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
