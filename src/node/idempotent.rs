//! Idempotent messages (PROTOCOL.md section 11.7): a client's message
//! whose frame id is its key is handled at most once per sender within
//! `dedupe_window`, whichever node each attempt reaches. The key is
//! claimed in the cluster (Redis, or the in-process engine) before the
//! message is handled, and its outcome (the Ack or Error the sender got)
//! recorded when it is answered; a later attempt gets that answer again
//! without the message being handled twice.

use std::sync::Arc;
use std::time::Duration;

use super::Node;
use crate::bus::{Bus, ClusterBus};
use crate::protocol::{ErrorCode, Frame, MessageId, error_code};
use crate::registry::{Answer, ClientHandle, Tap};

/// A claimed key whose message has not been handed off yet: dropped
/// before [`Claimed::handed_off`] (the connection closed mid-way), it
/// frees the key, so that a retry is handled instead of waiting for an
/// answer that will never come.
pub struct Claimed {
    bus: Arc<Bus>,
    client: Arc<ClientHandle>,
    id: MessageId,
    key: String,
    pending: String,
    armed: bool,
}

impl Claimed {
    /// The message was handled (its answer, if not given yet, will be
    /// recorded when it is).
    pub fn handed_off(mut self) {
        self.armed = false;
    }
}

impl Drop for Claimed {
    fn drop(&mut self) {
        if self.armed {
            self.client.untap(self.id);
            self.bus.once_release(&self.key, &self.pending);
        }
    }
}

/// How often an attempt whose key another attempt holds looks again.
const POLL: Duration = Duration::from_millis(50);

/// What an idempotency key holds, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Held {
    /// Being handled by the attempt on node `.0` (outcome not known yet).
    Pending(String),
    /// Answered with Ack.
    Acked,
    /// Stored for a recipient waiting to resume its session, until then.
    Stored(u64),
    /// Answered with an Error.
    Refused(ErrorCode, String),
}

impl Held {
    fn encode(answer: &Answer) -> String {
        match answer {
            Answer::Ack => "a".into(),
            Answer::Stored(until_ms) => format!("s:{until_ms}"),
            Answer::Error(code, message) => format!("e:{}:{message}", code.0),
        }
    }

    fn decode(held: &str) -> Held {
        if held == "a" {
            return Held::Acked;
        }
        if let Some(until_ms) = held.strip_prefix("s:").and_then(|u| u.parse().ok()) {
            return Held::Stored(until_ms);
        }
        if let Some(attempt) = held.strip_prefix("p:") {
            // `NODE/ATTEMPT`: the node is what the client is told.
            let node = attempt.split('/').next().unwrap_or_default();
            return Held::Pending(node.to_owned());
        }
        let refused = held.strip_prefix("e:").and_then(|rest| {
            let (code, message) = rest.split_once(':')?;
            Some(Held::Refused(
                ErrorCode(code.parse().ok()?),
                message.to_owned(),
            ))
        });
        refused.unwrap_or_else(|| Held::Pending(String::new()))
    }
}

impl Node {
    /// Claims the key of `frame` (an Idempotent frame's message) for
    /// `client`. True when this is the first attempt: the caller handles
    /// the message, and its answer is recorded. Otherwise the client has
    /// been answered here: Ack when the first attempt was acknowledged,
    /// Error 21 DUPLICATE naming its error, or saying it is still under
    /// way (after waiting up to `delivery_timeout` for it to end).
    pub async fn claim_idempotent(
        &self,
        client: &Arc<ClientHandle>,
        frame: &Frame,
    ) -> Option<Claimed> {
        let (id, priority) = (frame.id, frame.priority);
        // Keys are per user; anonymous clients share one scope (ids are
        // random 122-bit uuids: only a client reusing another's id meets
        // it).
        let scope = match &client.info.user {
            Some(user) => format!("u:{user}"),
            None => "anon".to_owned(),
        };
        let key = format!("{scope}:{id}");
        // Unique to this attempt, so that a claim retried after a lost
        // reply recognises its own key.
        let pending = format!("p:{}/{}", self.id(), MessageId::new_random());
        let window = self.config().dedupe_window;
        let deadline = tokio::time::Instant::now() + self.config().delivery_timeout;
        loop {
            let held = match self.bus().once_claim(&key, &pending, window).await {
                Ok(None) => {
                    let bus = self.bus_handle();
                    let settle_key = key.clone();
                    let tap: Tap = Box::new(move |answer: Answer| {
                        bus.once_settle(&settle_key, Held::encode(&answer));
                    });
                    client.tap_answer(id, tap);
                    return Some(Claimed {
                        bus: self.bus_handle(),
                        client: client.clone(),
                        id,
                        key,
                        pending,
                        armed: true,
                    });
                }
                Ok(Some(held)) => Held::decode(&held),
                Err(err) => {
                    let why =
                        format!("not handled: cannot check its idempotency key ({err}); retry");
                    let answer = Answer::Error(error_code::CLUSTER_UNAVAILABLE, why);
                    client.answer_untapped(priority, id, answer);
                    return None;
                }
            };
            // Answers about an earlier attempt: they must not be taken for
            // that attempt's own outcome (same id, maybe same connection).
            let answer = match held {
                Held::Acked => Answer::Ack,
                Held::Stored(until_ms) => Answer::Stored(until_ms),
                Held::Refused(code, message) => Answer::Error(
                    error_code::DUPLICATE,
                    format!(
                        "already handled, not again: the first attempt got error {}: {message}",
                        code.0
                    ),
                ),
                Held::Pending(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(POLL).await;
                    continue;
                }
                Held::Pending(node) => Answer::Error(
                    error_code::DUPLICATE,
                    format!(
                        "already being handled (by node {node}), outcome not known yet; not handled again"
                    ),
                ),
            };
            client.answer_untapped(priority, id, answer);
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_read_back_as_stored() {
        for answer in [
            Answer::Ack,
            Answer::Stored(1_234),
            Answer::Error(error_code::UNKNOWN_CLIENT, "no: such client".into()),
        ] {
            let held = Held::decode(&Held::encode(&answer));
            match (answer, held) {
                (Answer::Ack, Held::Acked) => {}
                (Answer::Stored(a), Held::Stored(b)) => assert_eq!(a, b),
                (Answer::Error(c, m), Held::Refused(c2, m2)) => assert_eq!((c, m), (c2, m2)),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(Held::decode("p:n1"), Held::Pending("n1".into()));
        assert_eq!(Held::decode("p:n1/a7"), Held::Pending("n1".into()));
        assert_eq!(Held::decode("garbage"), Held::Pending(String::new()));
    }
}
