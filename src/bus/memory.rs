//! The in-memory bus: the default for a single node, and the way to run
//! several nodes inside one process (tests, embedding). Nodes that join the
//! same [`MemoryCluster`] see each other's clients and exchange messages
//! through bounded channels.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use tokio::sync::mpsc;

use super::{
    BusError, BusMessage, ClusterBus, ClusterEventSender, Feed, Landed, PublishDone, Target,
    sort_and_cut,
};
use crate::protocol::{ClientId, ClientInfo, NodeId};

struct Member {
    inbox: ClusterEventSender,
    clients: HashMap<ClientId, ClientInfo>,
    /// Channel feeds this node wants.
    wanted: HashSet<(Feed, String)>,
    /// Subscribers per channel.
    subscribers: HashMap<String, usize>,
    /// Channel presence: members per channel.
    members: HashMap<String, HashMap<ClientId, ClientInfo>>,
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
                wanted: HashSet::new(),
                subscribers: HashMap::new(),
                members: HashMap::new(),
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

    fn with_me(&self, change: impl FnOnce(&mut Member)) {
        if let Some(me) = self.cluster.write().get_mut(&self.node_id) {
            change(me);
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

    fn client_left(&self, info: &ClientInfo) {
        self.with_me(|me| {
            me.clients.remove(&info.client_id);
        });
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
            Target::Channel => {
                let wanted = match &message {
                    BusMessage::Publication { channel, event, .. } => {
                        (Feed::of(*event), channel.clone())
                    }
                    _ => (Feed::Publications, String::new()),
                };
                Ok(members
                    .iter()
                    .filter(|(node, m)| **node != self.node_id && m.wanted.contains(&wanted))
                    .filter(|(node, member)| self.deliver(member, **node, message.clone()))
                    .count())
            }
        };
        drop(members);
        if let Some(done) = done {
            done(outcome);
        }
    }

    async fn leave(&self) {
        self.cluster.write().remove(&self.node_id);
    }

    fn want_channel(&self, channel: &str, feed: Feed, wanted: bool) {
        self.with_me(|me| {
            let key = (feed, channel.to_owned());
            if wanted {
                me.wanted.insert(key);
            } else {
                me.wanted.remove(&key);
            }
        });
    }

    async fn channel_sync(&self, _channel: &str, _feed: Feed) -> Result<(), BusError> {
        Ok(())
    }

    fn channel_member_joined(&self, channel: &str, info: &ClientInfo) -> Landed {
        self.with_me(|me| {
            me.members
                .entry(channel.to_owned())
                .or_default()
                .insert(info.client_id, info.clone());
        });
        None
    }

    fn channel_member_left(&self, channel: &str, id: ClientId) {
        self.with_me(|me| {
            if let Some(members) = me.members.get_mut(channel) {
                members.remove(&id);
                if members.is_empty() {
                    me.members.remove(channel);
                }
            }
        });
    }

    fn channel_subscribers(&self, channel: &str, count: usize) {
        self.with_me(|me| {
            if count == 0 {
                me.subscribers.remove(channel);
            } else {
                me.subscribers.insert(channel.to_owned(), count);
            }
        });
    }

    async fn channel_members(
        &self,
        channel: &str,
        limit: usize,
    ) -> Result<(Vec<ClientInfo>, bool), BusError> {
        let all = self
            .cluster
            .read()
            .values()
            .filter_map(|m| m.members.get(channel))
            .flat_map(|members| members.values().cloned())
            .collect();
        Ok(sort_and_cut(all, limit))
    }

    async fn channel_member_count(&self, channel: &str) -> Result<u64, BusError> {
        Ok(self
            .cluster
            .read()
            .values()
            .filter_map(|m| m.members.get(channel))
            .map(|members| members.len() as u64)
            .sum())
    }

    async fn channels(&self) -> Result<Vec<(String, u64)>, BusError> {
        let mut counts: HashMap<String, u64> = HashMap::new();
        for member in self.cluster.read().values() {
            for (channel, count) in &member.subscribers {
                *counts.entry(channel.clone()).or_default() += *count as u64;
            }
        }
        let mut channels: Vec<_> = counts.into_iter().collect();
        channels.sort();
        Ok(channels)
    }

    async fn locate_user(&self, user: &str) -> Result<Vec<NodeId>, BusError> {
        Ok(self
            .cluster
            .read()
            .iter()
            .filter(|(_, m)| m.clients.values().any(|c| c.user.as_deref() == Some(user)))
            .map(|(node, _)| *node)
            .collect())
    }
}
