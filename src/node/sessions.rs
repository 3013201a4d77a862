//! Resumable sessions on a node (PROTOCOL.md section 11.6, CLUSTER.md
//! "Sessions"): what a ResumeHandshake's token is worth, and the session a
//! connection gets. A session outlives its connection by the resume window:
//! the client that presents its token within it, on any node, gets the same
//! client id back and the direct messages stored for it meanwhile.

use std::sync::Arc;

use tracing::{debug, warn};

use super::{Node, NodeError};
use crate::bus::{BusError, BusMessage, Claim, ClusterBus, SessionLimits, Target};
use crate::config::NodeConfig;
use crate::protocol::{ClientId, SessionOutcome, now_ms};
use crate::session::{Claims, TokenError, TokenKeys};

/// The node's side of sessions: how tokens are signed and what sessions
/// may hold.
pub struct Sessions {
    keys: TokenKeys,
    limits: SessionLimits,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Sessions {
    /// Sessions as configured: off when the resume window is 0, or when
    /// there is no secret (none configured, and the node does not use dev
    /// certificates whose directory would hold one).
    pub(super) fn from_config(config: &NodeConfig) -> Result<Option<Sessions>, NodeError> {
        if config.session_resume_window.is_zero() {
            return Ok(None);
        }
        let secret = match (&config.session_secret, &config.cert) {
            (Some(secret), _) => secret.as_bytes().to_vec(),
            (None, None) => crate::tls::load_dev_session_secret(&config.certs_dir)
                .map_err(|e| NodeError::Sessions(e.to_string()))?,
            (None, Some(_)) => {
                warn!(
                    "resumable sessions are off: set session_secret (the same on every node) to turn them on"
                );
                return Ok(None);
            }
        };
        let keys = TokenKeys::new(
            &secret,
            config.session_secret_old.as_deref().map(str::as_bytes),
            &config.redis_prefix,
        );
        Ok(Some(Sessions {
            keys,
            limits: SessionLimits {
                window: config.session_resume_window,
                inbox_len: config.session_inbox_len,
                inbox_bytes: config.session_inbox_bytes,
                lifetime: config.session_token_lifetime,
            },
        }))
    }

    /// What sessions may hold.
    pub fn limits(&self) -> SessionLimits {
        self.limits
    }

    /// A token for `client`'s session of `user` at `generation`.
    pub fn issue(&self, client: ClientId, user: Option<&str>, generation: u64) -> String {
        self.keys.issue(&Claims {
            client,
            user: user.map(str::to_owned),
            generation,
            expires_ms: now_ms() + self.limits.lifetime.as_millis() as u64,
        })
    }
}

/// The session a connection gets from its ResumeHandshake.
#[derive(Debug)]
pub struct Granted {
    /// The connection's client id: the session's.
    pub client_id: ClientId,
    /// The session's generation (0: the connection has no session).
    pub generation: u64,
    /// What became of the resume asked for.
    pub outcome: SessionOutcome,
    /// For a resumed session: the direct messages stored while it was away.
    pub stored: Option<Vec<BusMessage>>,
}

impl Granted {
    fn fresh(outcome: SessionOutcome) -> Granted {
        Granted {
            client_id: ClientId::new_random(),
            generation: if outcome == SessionOutcome::Disabled {
                0
            } else {
                1
            },
            outcome,
            stored: None,
        }
    }
}

impl Node {
    /// The node's sessions, when they are on.
    pub fn sessions(&self) -> Option<&Sessions> {
        self.sessions.as_ref()
    }

    /// The session for a connection of `user` that asked to resume
    /// `resume` (None: a new session). A token that does not resume
    /// anything gives a new session and says why; only a cluster that
    /// cannot be asked is an error (the client retries with its token).
    /// A resumed session is attached here from now on, and the direct
    /// messages for it are held until [`Node::join`] registers it.
    pub async fn grant_session(
        &self,
        user: Option<&str>,
        resume: Option<&str>,
    ) -> Result<Granted, BusError> {
        let Some(sessions) = &self.sessions else {
            return Ok(Granted::fresh(SessionOutcome::Disabled));
        };
        let Some(token) = resume else {
            return Ok(Granted::fresh(SessionOutcome::New));
        };
        let claims = match sessions.keys.verify(token, now_ms()) {
            Ok(claims) => claims,
            Err(err) => {
                debug!(%err, "resume token not accepted");
                return Ok(Granted::fresh(match err {
                    TokenError::Invalid => SessionOutcome::Invalid,
                    TokenError::Expired => SessionOutcome::Expired,
                }));
            }
        };
        if claims.user.as_deref() != user {
            debug!("resume token of another user");
            return Ok(Granted::fresh(SessionOutcome::WrongUser));
        }
        let client = claims.client;
        self.router.hold(client);
        let claim = self
            .bus
            .session_claim(client, user, claims.generation, sessions.limits)
            .await;
        let (generation, stored, previous) = match claim {
            Ok(Claim::Resumed {
                generation,
                stored,
                previous,
            }) => (generation, stored, previous),
            other => {
                self.router.drop_hold(client);
                return match other? {
                    Claim::Gone => Ok(Granted::fresh(SessionOutcome::Expired)),
                    Claim::Used => Ok(Granted::fresh(SessionOutcome::AlreadyUsed)),
                    _ => Ok(Granted::fresh(SessionOutcome::WrongUser)),
                };
            }
        };
        match previous {
            Some(node) if node == self.id => self.take_over_here(client),
            Some(node) => {
                self.bus
                    .publish(Target::Node(node), BusMessage::Takeover { client }, None)
            }
            None => {}
        }
        Ok(Granted {
            client_id: client,
            generation,
            outcome: SessionOutcome::Resumed,
            stored: Some(stored),
        })
    }

    /// Closes this node's connection of `client` (code 13), whose session
    /// another connection resumed: at once out of the registry and its
    /// channels, so that the new connection takes its place.
    pub(super) fn take_over_here(&self, client: ClientId) {
        let Some(old) = self.registry.get(client) else {
            return;
        };
        if old.session().is_none() {
            return;
        }
        old.take_over();
        if self.registry.unregister(&old) {
            self.drop_subscriptions(client);
        }
    }

    /// A new token for the session `handle` holds, sent in a Session
    /// frame (Refreshed), with its record kept alive as long: a connection
    /// may outlive its first token.
    pub(crate) fn refresh_session(&self, handle: &Arc<crate::registry::ClientHandle>) {
        let (Some(sessions), Some(generation)) = (&self.sessions, handle.session()) else {
            return;
        };
        if handle.moved() {
            return;
        }
        self.bus
            .session_refreshed(handle.id(), generation, sessions.limits);
        handle.reply(
            crate::protocol::Priority::High,
            crate::protocol::Body::Session {
                token: sessions.issue(handle.id(), handle.info.user.as_deref(), generation),
                window_ms: sessions.limits.window.as_millis() as u64,
                outcome: SessionOutcome::Refreshed,
                stored: 0,
            },
        );
        self.stats.session(SessionOutcome::Refreshed);
    }

    /// Records the new session of a connection once it joined.
    pub(crate) fn session_opened(&self, handle: &Arc<crate::registry::ClientHandle>) {
        if let Some(sessions) = &self.sessions
            && handle.session() == Some(1)
        {
            self.bus
                .session_opened(handle.id(), handle.info.user.as_deref(), sessions.limits);
        }
    }
}
