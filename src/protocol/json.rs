//! JSON views of protocol values, shared by the `fabric` CLI's output and
//! the admin API: ids as text, payloads as text or base64.

use base64::Engine;
use serde_json::{Value, json};

use super::{Body, ClientInfo, Frame, Payload};

/// A client list entry as JSON (CLI output and the admin API).
pub fn client_json(c: &ClientInfo) -> Value {
    json!({
        "client_id": c.client_id.to_string(),
        "node_id": c.node_id.to_string(),
        "name": c.name,
        "user": c.user,
        "connected_at_ms": c.connected_at_ms,
    })
}

fn payload_fields(p: &Payload, out: &mut serde_json::Map<String, Value>) {
    match p {
        Payload::Text(t) => {
            out.insert("text".into(), json!(t));
        }
        Payload::Binary(b) => {
            out.insert(
                "data_base64".into(),
                json!(base64::engine::general_purpose::STANDARD.encode(b)),
            );
        }
    }
}

/// One received frame as a JSON object (the `listen` output format).
pub fn frame_json(frame: &Frame) -> Value {
    let mut out = serde_json::Map::new();
    out.insert("type".into(), json!(frame.body.name()));
    out.insert("id".into(), json!(frame.id.to_string()));
    out.insert("priority".into(), json!(frame.priority.to_string()));
    out.insert("timestamp_ms".into(), json!(frame.timestamp_ms));
    if let Some(s) = &frame.sender {
        out.insert(
            "from".into(),
            json!({"client_id": s.client_id.to_string(), "node_id": s.node_id.to_string(), "name": s.name, "user": s.user}),
        );
    }
    match &frame.body {
        Body::Text { text } => {
            out.insert("text".into(), json!(text));
        }
        Body::Binary { data } => payload_fields(&Payload::Binary(data.clone()), &mut out),
        Body::Broadcast { payload } => payload_fields(payload, &mut out),
        Body::Direct { to, payload } => {
            out.insert("to".into(), json!(to.to_string()));
            payload_fields(payload, &mut out);
        }
        Body::Error {
            of, code, message, ..
        } => {
            out.insert("of".into(), json!(of.map(|o| o.to_string())));
            out.insert("code".into(), json!(code.0));
            out.insert("message".into(), json!(message));
        }
        Body::Goodbye { reason, reconnect } => {
            out.insert("reason".into(), json!(reason));
            out.insert("reconnect".into(), json!(reconnect));
        }
        Body::Ack { of } | Body::Pong { of } => {
            out.insert("of".into(), json!(of.to_string()));
        }
        _ => {}
    }
    Value::Object(out)
}
