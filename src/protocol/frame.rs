//! Frame types. Field order here *is* the wire order (bincode legacy encoding),
//! so reordering fields or enum variants is a protocol change: bump the
//! protocol version and update `PROTOCOL.md`.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! uuid_newtype {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(#[serde(with = "uuid::serde::compact")] pub Uuid);

        impl $name {
            /// A fresh random (v4) id.
            pub fn new_random() -> Self {
                Self(Uuid::new_v4())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = uuid::Error;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

uuid_newtype!(
    /// Identifies one connected client; assigned by the node at handshake.
    ClientId
);
uuid_newtype!(
    /// Identifies one node of the cluster.
    NodeId
);
uuid_newtype!(
    /// Identifies one message; chosen by whoever creates the frame.
    MessageId
);

/// Delivery priority. Each priority has its own QUIC stream per direction,
/// so a large low-priority message never holds back a high-priority one.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub enum Priority {
    /// Bulk traffic; sent when nothing else is waiting.
    Low,
    /// The default.
    #[default]
    Normal,
    /// Control traffic and urgent messages; sent first.
    High,
}

impl Priority {
    /// All priorities, in wire index order.
    pub const ALL: [Priority; 3] = [Priority::Low, Priority::Normal, Priority::High];

    /// Position in [`Priority::ALL`] (equal to the wire index).
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        })
    }
}

impl std::str::FromStr for Priority {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "low" => Ok(Priority::Low),
            "normal" => Ok(Priority::Normal),
            "high" => Ok(Priority::High),
            other => Err(format!(
                "unknown priority {other:?} (expected low, normal or high)"
            )),
        }
    }
}

/// Error code carried in an Error frame. A plain number on the wire so that
/// codes added later still decode; named values live in `protocol::error_code`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ErrorCode(pub u16);

/// Who sent a message. Always filled in by the node from the connection the
/// message arrived on; whatever a client puts here is overwritten.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sender {
    /// The sending client.
    pub client_id: ClientId,
    /// The node the sender is connected to.
    pub node_id: NodeId,
    /// The name the sender gave in its handshake.
    pub name: String,
    /// Authenticated user id, when the node authenticates clients.
    pub user: Option<String>,
}

/// Content of a Broadcast or Direct message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload {
    /// UTF-8 text.
    Text(String),
    /// Opaque bytes.
    Binary(#[serde(with = "serde_bytes")] Vec<u8>),
}

impl Payload {
    /// Number of content bytes.
    pub fn len(&self) -> usize {
        match self {
            Payload::Text(t) => t.len(),
            Payload::Binary(b) => b.len(),
        }
    }

    /// Whether the payload has no content bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One entry of a client list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    /// The client.
    pub client_id: ClientId,
    /// The node it is connected to.
    pub node_id: NodeId,
    /// Its handshake name.
    pub name: String,
    /// Its authenticated user id, if any.
    pub user: Option<String>,
    /// When it connected, Unix milliseconds.
    pub connected_at_ms: u64,
}

/// Counters a node reports in a Stats frame.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStats {
    /// The reporting node.
    pub node_id: NodeId,
    /// The node's configured name.
    pub server_name: String,
    /// Milliseconds since the node started.
    pub uptime_ms: u64,
    /// Clients connected to this node now.
    pub clients_connected: u64,
    /// Connections accepted since start (handshake completed).
    pub connections_total: u64,
    /// Frames received from clients.
    pub messages_in: u64,
    /// Frames queued to clients.
    pub messages_out: u64,
    /// Frame bytes received from clients (prefix included).
    pub bytes_in: u64,
    /// Frame bytes queued to clients (prefix included).
    pub bytes_out: u64,
    /// Error frames sent.
    pub errors: u64,
    /// Clients disconnected because their outbound queue was full.
    pub slow_consumer_disconnects: u64,
}

/// Handshake sent by the client as its very first frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handshake {
    /// Lowest protocol version the client speaks.
    pub min_version: u16,
    /// Highest protocol version the client speaks.
    pub max_version: u16,
    /// Display name, 1..=64 bytes of UTF-8.
    pub name: String,
    /// Bearer token, for nodes that authenticate clients.
    pub token: Option<String>,
}

/// The node's answer to a successful handshake.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandshakeAck {
    /// The version chosen: the highest both sides speak.
    pub version: u16,
    /// The id the node assigned to this client.
    pub client_id: ClientId,
    /// The node the client is connected to.
    pub node_id: NodeId,
    /// The node's configured name.
    pub server_name: String,
    /// Largest frame payload the node accepts, in bytes.
    pub max_frame_bytes: u32,
}

/// What a frame says. Variant order is the wire type number.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// 0. Client → node, first frame of a connection.
    Handshake(Handshake),
    /// 1. Node → client, answer to a valid Handshake.
    HandshakeAck(HandshakeAck),
    /// 2. Client → node: text for the node, echoed back and acknowledged.
    Text {
        /// The text.
        text: String,
    },
    /// 3. Client → node: bytes for the node, echoed back and acknowledged.
    Binary {
        /// The bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// 4. Client → node: deliver to every other client; node → client: a delivery.
    Broadcast {
        /// The content.
        payload: Payload,
    },
    /// 5. Client → node: deliver to one client; node → client: a delivery.
    Direct {
        /// The recipient.
        to: ClientId,
        /// The content.
        payload: Payload,
    },
    /// 6. Either way: asks for a Pong.
    Ping,
    /// 7. Answer to the Ping whose id is `of`.
    Pong {
        /// Id of the Ping.
        of: MessageId,
    },
    /// 8. Client → node: asks for a ClientList.
    ListClients,
    /// 9. Node → client: the connected clients.
    ClientList {
        /// Id of the ListClients request.
        of: MessageId,
        /// The clients, at most the node's `max_list_clients`.
        clients: Vec<ClientInfo>,
        /// True when more clients exist than were returned.
        truncated: bool,
    },
    /// 10. Node → client: the message `of` was accepted and handed on.
    Ack {
        /// Id of the acknowledged message.
        of: MessageId,
    },
    /// 11. Node → client: something went wrong.
    Error {
        /// Id of the frame that caused it, when known.
        of: Option<MessageId>,
        /// Machine-readable code (`protocol::error_code`).
        code: ErrorCode,
        /// Human-readable reason.
        message: String,
        /// For RATE_LIMITED: milliseconds until a frame would be accepted again.
        retry_after_ms: Option<u32>,
    },
    /// 12. Either way: the sender is about to close the connection.
    Goodbye {
        /// Why.
        reason: String,
        /// True when the client should reconnect (e.g. the node is restarting).
        reconnect: bool,
    },
    /// 13. Client → node: asks for a Stats frame.
    StatsRequest,
    /// 14. Node → client: the node's counters.
    Stats {
        /// Id of the StatsRequest.
        of: MessageId,
        /// The counters.
        stats: NodeStats,
    },
    /// 15. Client → node (version 2): subscribe to a channel; answered
    ///     with SubscribeAck or an Error.
    Subscribe {
        /// The channel (`[namespace:]name`, PROTOCOL.md section 7).
        channel: String,
        /// Whether to receive Join and Leave events of the channel.
        events: bool,
    },
    /// 16. Node → client: the subscription `of` is in place cluster-wide.
    SubscribeAck {
        /// Id of the Subscribe.
        of: MessageId,
        /// The channel.
        channel: String,
        /// Members of the channel across the cluster, this client included,
        /// when the namespace has presence on (else not revealed).
        subscribers: Option<u64>,
    },
    /// 17. Client → node (version 2): leave a channel; answered with Ack
    ///     (also when the client was not subscribed).
    Unsubscribe {
        /// The channel.
        channel: String,
    },
    /// 18. Client → node (version 2): publish to a channel's subscribers;
    ///     node → client: a publication of a channel this client subscribed to
    ///     (stamped with its sender, or none when the server published it).
    Publish {
        /// The channel.
        channel: String,
        /// The content.
        payload: Payload,
    },
    /// 19. Node → client: `member` subscribed to `channel` (only to
    ///     subscribers that asked for events, in namespaces that send them).
    Join {
        /// The channel.
        channel: String,
        /// Who joined.
        member: ClientInfo,
    },
    /// 20. Node → client: `member` left `channel`.
    Leave {
        /// The channel.
        channel: String,
        /// Who left.
        member: ClientInfo,
    },
    /// 21. Client → node (version 2): asks for a channel's members.
    PresenceRequest {
        /// The channel.
        channel: String,
    },
    /// 22. Node → client: the members of a channel across the cluster.
    Presence {
        /// Id of the PresenceRequest.
        of: MessageId,
        /// The channel.
        channel: String,
        /// The members, oldest connection first, at most the node's
        /// `max_presence_members`.
        members: Vec<ClientInfo>,
        /// True when more members exist than were returned.
        truncated: bool,
    },
    /// 23. Client → node (version 2): deliver to every connection of
    ///     `user`, on every node; node → client: such a delivery.
    UserDirect {
        /// The recipient user (a token subject or certificate name).
        user: String,
        /// The content.
        payload: Payload,
    },
    /// 24. Node → client: the client no longer receives `channel` (an
    ///     operator unsubscribed it).
    Unsubscribed {
        /// The channel.
        channel: String,
        /// Why.
        reason: String,
    },
    /// 25. Node → client (version 3): a publication of a channel with
    ///     history, at its position (instead of a Publish).
    Publication {
        /// The channel.
        channel: String,
        /// The content.
        payload: Payload,
        /// Its place in the channel's history.
        position: super::Position,
    },
    /// 26. Client → node (version 3): subscribe, recovering what was
    ///     published after `since`; answered with Subscribed or an Error.
    SubscribeSince {
        /// The channel.
        channel: String,
        /// Whether to receive Join and Leave events of the channel.
        events: bool,
        /// The position of the last publication the client has (None: no
        /// recovery, just the current position).
        since: Option<super::Position>,
    },
    /// 27. Node → client: the SubscribeSince `of` is in place; the
    ///     publications it recovered came before it.
    Subscribed {
        /// Id of the SubscribeSince.
        of: MessageId,
        /// The channel.
        channel: String,
        /// Members across the cluster, when the namespace has presence on.
        subscribers: Option<u64>,
        /// The channel's position: the last publication sent to the client
        /// before this frame, or the latest one (None: no history).
        position: Option<super::Position>,
        /// What became of the recovery.
        recovery: Recovery,
    },
    /// 28. Client → node (version 3): the latest publications of a
    ///     channel's history; answered with History or an Error.
    HistoryRequest {
        /// The channel.
        channel: String,
        /// Most publications wanted (the node may return fewer).
        limit: u32,
        /// Only those older than this offset (None: the newest).
        before: Option<u64>,
    },
    /// 29. Node → client: publications of a channel's history.
    History {
        /// Id of the HistoryRequest.
        of: MessageId,
        /// The channel.
        channel: String,
        /// The channel's current position.
        position: super::Position,
        /// Complete Publication frames (length prefix included), oldest
        /// first.
        publications: Vec<bytes::Bytes>,
        /// Whether older publications are kept.
        more: bool,
    },
    /// 30. Node → client: the node could not deliver every publication of
    ///     `channel` to this subscriber (it is still subscribed): subscribe
    ///     again with `since` to recover, or learn what was lost.
    SubscriptionLost {
        /// The channel.
        channel: String,
        /// Why.
        reason: String,
    },
    /// 31. Client → node (version 3): `message` with this frame's `id` as
    ///     its idempotency key: the cluster handles a given key of a given
    ///     sender at most once within the node's `dedupe_window`, so the
    ///     client may send the same frame again after losing its answer.
    Idempotent {
        /// What to do.
        message: Keyed,
    },
    /// 32. Client → node (version 3), instead of a Handshake: the same
    ///     handshake, asking for a resumable session, and resuming the one
    ///     `resume` names if it can. Answered with HandshakeAck, then
    ///     Session.
    ResumeHandshake {
        /// The handshake itself (version range, name, token).
        handshake: Handshake,
        /// The resume token of the session to resume (None: a new one).
        resume: Option<String>,
    },
    /// 33. Node → client, right after the HandshakeAck that answers a
    ///     ResumeHandshake: the session this connection belongs to.
    Session {
        /// Presents this connection's session in the next
        /// ResumeHandshake (empty when sessions are off).
        token: String,
        /// How long the session waits for a resume once the connection is
        /// lost, in milliseconds (0: sessions are off).
        window_ms: u64,
        /// What became of the `resume` asked for.
        outcome: SessionOutcome,
        /// Direct messages stored for the session while it was away; they
        /// follow this frame.
        stored: u32,
    },
    /// 34. Node → client (version 3): the Direct `of` was stored for a
    ///     recipient whose session waits for a resume (instead of Ack).
    Stored {
        /// Id of the Direct.
        of: MessageId,
        /// When the recipient's session ends unless it resumes (Unix
        /// milliseconds); the message is delivered if it resumes before.
        until_ms: u64,
    },
}

/// What became of a ResumeHandshake's `resume` (wire: u32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SessionOutcome {
    /// 0: no resume was asked for: a new session.
    New,
    /// 1: the session was resumed: same client id, stored messages follow.
    Resumed,
    /// 2: the session is gone (its window passed, it ended with a Goodbye,
    ///    or the cluster lost it): a new session.
    Expired,
    /// 3: the token was already used (by a resume that won), so it is no
    ///    longer current: a new session.
    AlreadyUsed,
    /// 4: the token is not one of this cluster's, or is damaged or expired:
    ///    a new session.
    Invalid,
    /// 5: the token belongs to another user than this connection's: a new
    ///    session.
    WrongUser,
    /// 6: this node does not keep sessions: the connection is not
    ///    resumable (`token` is empty).
    Disabled,
    /// 7: not an answer to a handshake: a new token for the connection's
    ///    session (the previous one was close to its expiry); it replaces
    ///    the previous token, which still works until then.
    Refreshed,
}

impl SessionOutcome {
    /// Lowercase name, for logs and JSON output.
    pub fn name(self) -> &'static str {
        match self {
            SessionOutcome::New => "new",
            SessionOutcome::Resumed => "resumed",
            SessionOutcome::Expired => "expired",
            SessionOutcome::AlreadyUsed => "already_used",
            SessionOutcome::Invalid => "invalid",
            SessionOutcome::WrongUser => "wrong_user",
            SessionOutcome::Disabled => "disabled",
            SessionOutcome::Refreshed => "refreshed",
        }
    }
}

/// What an Idempotent frame asks for (wire: u32 tag, then the fields):
/// the body of the frame it stands for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Keyed {
    /// 0: as a Broadcast.
    Broadcast {
        /// The content.
        payload: Payload,
    },
    /// 1: as a Direct.
    Direct {
        /// The recipient.
        to: ClientId,
        /// The content.
        payload: Payload,
    },
    /// 2: as a Publish.
    Publish {
        /// The channel.
        channel: String,
        /// The content.
        payload: Payload,
    },
    /// 3: as a UserDirect.
    UserDirect {
        /// The recipient user.
        user: String,
        /// The content.
        payload: Payload,
    },
}

impl Keyed {
    /// The frame body it stands for.
    pub fn into_body(self) -> Body {
        match self {
            Keyed::Broadcast { payload } => Body::Broadcast { payload },
            Keyed::Direct { to, payload } => Body::Direct { to, payload },
            Keyed::Publish { channel, payload } => Body::Publish { channel, payload },
            Keyed::UserDirect { user, payload } => Body::UserDirect { user, payload },
        }
    }

    /// The Keyed form of `body`, for the bodies that have one (else
    /// `body` back, boxed).
    pub fn from_body(body: Body) -> Result<Keyed, Box<Body>> {
        match body {
            Body::Broadcast { payload } => Ok(Keyed::Broadcast { payload }),
            Body::Direct { to, payload } => Ok(Keyed::Direct { to, payload }),
            Body::Publish { channel, payload } => Ok(Keyed::Publish { channel, payload }),
            Body::UserDirect { user, payload } => Ok(Keyed::UserDirect { user, payload }),
            other => Err(Box::new(other)),
        }
    }
}

/// What became of a SubscribeSince's recovery (wire: u32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Recovery {
    /// 0: no `since` was given.
    NotRequested,
    /// 1: every publication after `since` was sent before the Subscribed
    ///    (possibly none): nothing was missed.
    Recovered,
    /// 2: the channel's history was lost since (a new epoch): what the old
    ///    epoch published after `since` cannot be told. The new epoch was
    ///    replayed from its first publication when it is still whole,
    ///    else nothing was.
    EpochChanged,
    /// 3: publications after `since` are no longer kept (trimmed or
    ///    expired). Nothing was replayed.
    Trimmed,
    /// 4: the channel's namespace keeps no history.
    NoHistory,
    /// 5: `since` is beyond the channel's latest publication (a position
    ///    the client cannot have got from this history). Nothing was
    ///    replayed.
    Ahead,
}

impl Recovery {
    /// Lowercase name, for logs and JSON output.
    pub fn name(self) -> &'static str {
        match self {
            Recovery::NotRequested => "not_requested",
            Recovery::Recovered => "recovered",
            Recovery::EpochChanged => "epoch_changed",
            Recovery::Trimmed => "trimmed",
            Recovery::NoHistory => "no_history",
            Recovery::Ahead => "ahead",
        }
    }
}

/// Names of the frame types, indexed by wire tag ([`Body::tag`]).
pub const FRAME_NAMES: [&str; 35] = [
    "handshake",
    "handshake_ack",
    "text",
    "binary",
    "broadcast",
    "direct",
    "ping",
    "pong",
    "list_clients",
    "client_list",
    "ack",
    "error",
    "goodbye",
    "stats_request",
    "stats",
    "subscribe",
    "subscribe_ack",
    "unsubscribe",
    "publish",
    "join",
    "leave",
    "presence_request",
    "presence",
    "user_direct",
    "unsubscribed",
    "publication",
    "subscribe_since",
    "subscribed",
    "history_request",
    "history",
    "subscription_lost",
    "idempotent",
    "resume_handshake",
    "session",
    "stored",
];

/// First wire tag of the frames protocol version 2 added; a version-1
/// connection neither sends nor receives them.
pub const FIRST_V2_TAG: usize = 15;

/// First wire tag of the frames protocol version 3 added.
pub const FIRST_V3_TAG: usize = 25;

/// The protocol version that introduced frame type `tag`.
pub fn version_of_tag(tag: usize) -> u16 {
    match tag {
        t if t >= FIRST_V3_TAG => 3,
        t if t >= FIRST_V2_TAG => 2,
        _ => 1,
    }
}

/// Wire tags of the frame types the node queues itself (see [`Body::tag`]).
pub mod tag {
    /// Text echo.
    pub const TEXT: usize = 2;
    /// Binary echo.
    pub const BINARY: usize = 3;
    /// Broadcast.
    pub const BROADCAST: usize = 4;
    /// Direct.
    pub const DIRECT: usize = 5;
    /// Goodbye.
    pub const GOODBYE: usize = 12;
    /// A channel publication.
    pub const PUBLISH: usize = 18;
    /// A Join event.
    pub const JOIN: usize = 19;
    /// A Leave event.
    pub const LEAVE: usize = 20;
    /// A delivery to a user.
    pub const USER_DIRECT: usize = 23;
    /// An operator's unsubscription.
    pub const UNSUBSCRIBED: usize = 24;
    /// A publication with its position.
    pub const PUBLICATION: usize = 25;
    /// A lost subscription.
    pub const SUBSCRIPTION_LOST: usize = 30;
    /// The session frame after a HandshakeAck.
    pub const SESSION: usize = 33;
}

impl Body {
    /// Short lowercase name of the frame type, for logs and JSON output.
    pub fn name(&self) -> &'static str {
        FRAME_NAMES[self.tag()]
    }

    /// The body's wire tag (0 to 34), also its index in [`FRAME_NAMES`].
    pub fn tag(&self) -> usize {
        match self {
            Body::Handshake(_) => 0,
            Body::HandshakeAck(_) => 1,
            Body::Text { .. } => 2,
            Body::Binary { .. } => 3,
            Body::Broadcast { .. } => 4,
            Body::Direct { .. } => 5,
            Body::Ping => 6,
            Body::Pong { .. } => 7,
            Body::ListClients => 8,
            Body::ClientList { .. } => 9,
            Body::Ack { .. } => 10,
            Body::Error { .. } => 11,
            Body::Goodbye { .. } => 12,
            Body::StatsRequest => 13,
            Body::Stats { .. } => 14,
            Body::Subscribe { .. } => 15,
            Body::SubscribeAck { .. } => 16,
            Body::Unsubscribe { .. } => 17,
            Body::Publish { .. } => 18,
            Body::Join { .. } => 19,
            Body::Leave { .. } => 20,
            Body::PresenceRequest { .. } => 21,
            Body::Presence { .. } => 22,
            Body::UserDirect { .. } => 23,
            Body::Unsubscribed { .. } => 24,
            Body::Publication { .. } => 25,
            Body::SubscribeSince { .. } => 26,
            Body::Subscribed { .. } => 27,
            Body::HistoryRequest { .. } => 28,
            Body::History { .. } => 29,
            Body::SubscriptionLost { .. } => 30,
            Body::Idempotent { .. } => 31,
            Body::ResumeHandshake { .. } => 32,
            Body::Session { .. } => 33,
            Body::Stored { .. } => 34,
        }
    }

    /// The request this frame answers, for reply frames.
    pub fn reply_to(&self) -> Option<MessageId> {
        match self {
            Body::Pong { of } | Body::Ack { of } => Some(*of),
            Body::ClientList { of, .. }
            | Body::Stats { of, .. }
            | Body::SubscribeAck { of, .. }
            | Body::Presence { of, .. }
            | Body::Subscribed { of, .. }
            | Body::History { of, .. }
            | Body::Stored { of, .. } => Some(*of),
            Body::Error { of, .. } => *of,
            _ => None,
        }
    }
}

/// One protocol message: a header shared by every type, then the body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame {
    /// Unique id of this message.
    pub id: MessageId,
    /// Delivery priority.
    pub priority: Priority,
    /// When the message was created, Unix milliseconds (sender's clock).
    pub timestamp_ms: u64,
    /// Who sent it; set by the node, ignored from clients.
    pub sender: Option<Sender>,
    /// What it says.
    pub body: Body,
}

impl Frame {
    /// A new frame with a fresh id, the given priority and the current time.
    pub fn new(priority: Priority, body: Body) -> Self {
        Frame {
            id: MessageId::new_random(),
            priority,
            timestamp_ms: now_ms(),
            sender: None,
            body,
        }
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
