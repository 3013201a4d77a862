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

/// A publication as a `fabric sub` line: [`frame_json`] typed
/// `publication`, a binary payload under `binary` (base64; `listen` calls
/// it `data_base64`).
pub fn publication_json(frame: &Frame) -> Value {
    let mut line = frame_json(frame);
    line["type"] = json!("publication");
    if let Some(object) = line.as_object_mut()
        && let Some(data) = object.remove("data_base64")
    {
        object.insert("binary".into(), data);
    }
    line
}

/// A position as `"epoch"` (16 hex digits) and `"offset"` (null, null
/// when there is none).
fn position_fields(
    position: Option<&crate::protocol::Position>,
    out: &mut serde_json::Map<String, Value>,
) {
    out.insert("epoch".into(), json!(position.map(|p| p.epoch_hex())));
    out.insert("offset".into(), json!(position.map(|p| p.offset)));
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
        Body::Subscribe { channel, events } => {
            out.insert("channel".into(), json!(channel));
            out.insert("events".into(), json!(events));
        }
        Body::SubscribeAck {
            of,
            channel,
            subscribers,
        } => {
            out.insert("of".into(), json!(of.to_string()));
            out.insert("channel".into(), json!(channel));
            out.insert("subscribers".into(), json!(subscribers));
        }
        Body::Unsubscribe { channel } | Body::PresenceRequest { channel } => {
            out.insert("channel".into(), json!(channel));
        }
        Body::Publish { channel, payload } => {
            out.insert("channel".into(), json!(channel));
            payload_fields(payload, &mut out);
            // A publication without a sender is the server's (admin API).
            out.entry("from").or_insert(Value::Null);
        }
        Body::Join { channel, member } | Body::Leave { channel, member } => {
            out.insert("channel".into(), json!(channel));
            out.insert("member".into(), client_json(member));
        }
        Body::Presence {
            of,
            channel,
            members,
            truncated,
        } => {
            out.insert("of".into(), json!(of.to_string()));
            out.insert("channel".into(), json!(channel));
            out.insert(
                "members".into(),
                Value::Array(members.iter().map(client_json).collect()),
            );
            out.insert("truncated".into(), json!(truncated));
        }
        Body::UserDirect { user, payload } => {
            out.insert("user".into(), json!(user));
            payload_fields(payload, &mut out);
        }
        Body::Unsubscribed { channel, reason } | Body::SubscriptionLost { channel, reason } => {
            out.insert("channel".into(), json!(channel));
            out.insert("reason".into(), json!(reason));
        }
        Body::Publication {
            channel,
            payload,
            position,
        } => {
            out.insert("channel".into(), json!(channel));
            payload_fields(payload, &mut out);
            out.entry("from").or_insert(Value::Null);
            position_fields(Some(position), &mut out);
        }
        Body::SubscribeSince {
            channel,
            events,
            since,
        } => {
            out.insert("channel".into(), json!(channel));
            out.insert("events".into(), json!(events));
            out.insert("since".into(), json!(since.map(|p| p.to_string())));
        }
        Body::Subscribed {
            of,
            channel,
            subscribers,
            position,
            recovery,
        } => {
            out.insert("of".into(), json!(of.to_string()));
            out.insert("channel".into(), json!(channel));
            out.insert("subscribers".into(), json!(subscribers));
            out.insert(
                "recovered".into(),
                json!(*recovery == crate::protocol::Recovery::Recovered),
            );
            out.insert("recovery".into(), json!(recovery.name()));
            position_fields(position.as_ref(), &mut out);
        }
        Body::HistoryRequest {
            channel,
            limit,
            before,
        } => {
            out.insert("channel".into(), json!(channel));
            out.insert("limit".into(), json!(limit));
            out.insert("before".into(), json!(before));
        }
        Body::Idempotent { message } => {
            let inner = frame_json(&Frame {
                body: message.clone().into_body(),
                ..frame.clone()
            });
            out.insert("message".into(), inner);
        }
        Body::History {
            of,
            channel,
            position,
            publications,
            more,
        } => {
            out.insert("of".into(), json!(of.to_string()));
            out.insert("channel".into(), json!(channel));
            position_fields(Some(position), &mut out);
            out.insert("count".into(), json!(publications.len()));
            out.insert("more".into(), json!(more));
        }
        _ => {}
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ClientId, Frame, NodeId, Priority, Sender};

    fn member(name: &str) -> ClientInfo {
        ClientInfo {
            client_id: ClientId::new_random(),
            node_id: NodeId::new_random(),
            name: name.into(),
            user: Some("u".into()),
            connected_at_ms: 7,
        }
    }

    #[test]
    fn a_publication_names_its_channel_and_sender_or_null_for_the_server() {
        let body = Body::Publish {
            channel: "news".into(),
            payload: Payload::Text("hi".into()),
        };
        let mut frame = Frame::new(Priority::High, body);
        let server = frame_json(&frame);
        assert_eq!(server["type"], "publish");
        assert_eq!(server["channel"], "news");
        assert_eq!(server["text"], "hi");
        assert_eq!(server["priority"], "high");
        assert_eq!(server["from"], Value::Null);

        let who = member("alice");
        frame.sender = Some(Sender {
            client_id: who.client_id,
            node_id: who.node_id,
            name: who.name.clone(),
            user: None,
        });
        frame.body = Body::Publish {
            channel: "news".into(),
            payload: Payload::Binary(vec![0, 1, 2]),
        };
        let client = frame_json(&frame);
        assert_eq!(client["from"]["name"], "alice");
        assert_eq!(client["from"]["client_id"], who.client_id.to_string());
        assert_eq!(client["data_base64"], "AAEC");
        assert!(client.get("text").is_none());
    }

    #[test]
    fn channel_events_and_presence_show_members_like_the_client_list() {
        let who = member("bob");
        let join = frame_json(&Frame::new(
            Priority::Normal,
            Body::Join {
                channel: "room".into(),
                member: who.clone(),
            },
        ));
        assert_eq!(join["type"], "join");
        assert_eq!(join["channel"], "room");
        assert_eq!(join["member"], client_json(&who));
        assert!(join.get("from").is_none(), "events have no sender");

        let of = crate::protocol::MessageId::new_random();
        let presence = frame_json(&Frame::new(
            Priority::Normal,
            Body::Presence {
                of,
                channel: "room".into(),
                members: vec![who.clone()],
                truncated: false,
            },
        ));
        assert_eq!(presence["of"], of.to_string());
        assert_eq!(presence["members"][0]["name"], "bob");
        assert_eq!(presence["members"][0]["connected_at_ms"], 7);
        assert_eq!(presence["truncated"], false);

        let gone = frame_json(&Frame::new(
            Priority::Normal,
            Body::Unsubscribed {
                channel: "room".into(),
                reason: "spam".into(),
            },
        ));
        assert_eq!(gone["type"], "unsubscribed");
        assert_eq!(gone["reason"], "spam");

        let ack = frame_json(&Frame::new(
            Priority::Normal,
            Body::SubscribeAck {
                of,
                channel: "room".into(),
                subscribers: None,
            },
        ));
        assert_eq!(ack["subscribers"], Value::Null);
    }
}
