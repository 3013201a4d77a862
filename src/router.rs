//! Message router: decides where a message goes and hands it to the right
//! outbound queues. It knows nothing of streams or frames' meaning.

use std::sync::Arc;

use bytes::Bytes;

use crate::client_manager::{ClientManager, EnqueueError};
use crate::protocol::{ClientId, Priority};

/// Why a direct message could not be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No client with that id is connected.
    #[error("no client with id {0} is connected")]
    UnknownClient(ClientId),
    /// The recipient is being disconnected as a slow consumer.
    #[error("client {0} is not reading fast enough and is being disconnected")]
    RecipientSlow(ClientId),
}

/// Delivers encoded frames to clients.
#[derive(Debug, Clone)]
pub struct Router {
    clients: Arc<ClientManager>,
}

impl Router {
    /// A router over the given registry.
    pub fn new(clients: Arc<ClientManager>) -> Self {
        Router { clients }
    }

    /// Delivers `frame` to every client but `from`; returns how many took it.
    pub fn broadcast(&self, from: ClientId, priority: Priority, frame: &Bytes) -> usize {
        self.clients.broadcast(Some(from), priority, frame)
    }

    /// Delivers `frame` to client `to`.
    pub fn direct(&self, to: ClientId, priority: Priority, frame: Bytes) -> Result<(), RouteError> {
        let client = self.clients.get(to).ok_or(RouteError::UnknownClient(to))?;
        match client.enqueue(priority, frame) {
            Ok(()) => Ok(()),
            Err(EnqueueError::SlowConsumer) => Err(RouteError::RecipientSlow(to)),
            Err(EnqueueError::Closed) => Err(RouteError::UnknownClient(to)),
        }
    }
}
