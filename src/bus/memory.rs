//! The in-memory bus: the default for a single node, and the way to run
//! several nodes inside one process (tests, embedding). Nodes that join the
//! same [`MemoryCluster`] see each other's clients and exchange messages
//! through bounded channels.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use tokio::sync::mpsc;

use super::{
    BusError, BusMessage, ClusterBus, ClusterEventSender, PublishDone, Target, sort_and_cut,
};
use crate::protocol::{ClientId, ClientInfo, NodeId};

struct Member {
    inbox: ClusterEventSender,
    clients: HashMap<ClientId, ClientInfo>,
}

/// The shared state of in-process nodes.
#[derive(Default)]
pub struct MemoryCluster {
    members: RwLock<HashMap<NodeId, Member>>,
}

impl MemoryCluster {
    /// An empty cluster.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<NodeId, Member>> {
        self.members.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<NodeId, Member>> {
        self.members.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// One node's handle on a [`MemoryCluster`].
pub struct MemoryBus {
    cluster: Arc<MemoryCluster>,
    node_id: NodeId,
    clustered: bool,
}

impl MemoryBus {
    /// Joins `cluster` as `node_id`; messages for this node go to `inbox`.
    pub fn join(cluster: Arc<MemoryCluster>, node_id: NodeId, inbox: ClusterEventSender) -> Self {
        cluster.write().insert(
            node_id,
            Member {
                inbox,
                clients: HashMap::new(),
            },
        );
        MemoryBus {
            cluster,
            node_id,
            clustered: true,
        }
    }

    /// A lone node: no other node can ever join.
    pub fn single(node_id: NodeId, inbox: ClusterEventSender) -> Self {
        MemoryBus {
            clustered: false,
            ..Self::join(MemoryCluster::new(), node_id, inbox)
        }
    }

    fn deliver(&self, member: &Member, node: NodeId, message: BusMessage) -> bool {
        match member.inbox.try_send(message) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(%node, "in-memory bus: node inbox full, message dropped");
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

impl ClusterBus for MemoryBus {
    fn start(&self) {}

    fn available(&self) -> bool {
        true
    }

    fn clustered(&self) -> bool {
        self.clustered
    }

    async fn client_joined(&self, info: &ClientInfo) {
        if let Some(me) = self.cluster.write().get_mut(&self.node_id) {
            me.clients.insert(info.client_id, info.clone());
        }
    }

    fn client_left(&self, id: ClientId) {
        if let Some(me) = self.cluster.write().get_mut(&self.node_id) {
            me.clients.remove(&id);
        }
    }

    async fn locate(&self, id: ClientId) -> Result<Option<NodeId>, BusError> {
        Ok(self
            .cluster
            .read()
            .iter()
            .find(|(_, m)| m.clients.contains_key(&id))
            .map(|(node, _)| *node))
    }

    async fn list_clients(&self, limit: usize) -> Result<(Vec<ClientInfo>, bool), BusError> {
        let all = self
            .cluster
            .read()
            .values()
            .flat_map(|m| m.clients.values().cloned())
            .collect();
        Ok(sort_and_cut(all, limit))
    }

    async fn live_nodes(&self) -> Result<Vec<NodeId>, BusError> {
        Ok(self.cluster.read().keys().copied().collect())
    }

    fn publish(&self, target: Target, message: BusMessage, done: Option<PublishDone>) {
        let members = self.cluster.read();
        let outcome = match target {
            Target::AllNodes => {
                // This node counts as reached, as a Redis subscriber does.
                let reached = 1 + members
                    .iter()
                    .filter(|(node, _)| **node != self.node_id)
                    .filter(|(node, member)| self.deliver(member, **node, message.clone()))
                    .count();
                let live = members.len().max(1);
                if reached >= live {
                    Ok(reached)
                } else {
                    Err(BusError::Partial { reached, live })
                }
            }
            Target::Node(node) => match members.get(&node) {
                None => Ok(0),
                Some(member) if self.deliver(member, node, message) => Ok(1),
                Some(_) => Err(BusError::NotListening(node)),
            },
        };
        drop(members);
        if let Some(done) = done {
            done(outcome);
        }
    }

    async fn leave(&self) {
        self.cluster.write().remove(&self.node_id);
    }
}
