//! The in-memory bus: the default for a single node, and the way to run
//! several nodes inside one process (tests, embedding). Nodes that join the
//! same [`MemoryCluster`] see each other's clients and exchange messages
//! through bounded channels.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{
    BusError, BusMessage, Claim, ClusterBus, ClusterEvent, ClusterEventSender, Feed, HistoryEntry,
    HistoryPage, HistoryRange, Landed, PublishDone, Retention, SessionEnd, SessionLimits,
    StoreDone, Storing, Target, sort_and_cut,
};
use crate::protocol::{ClientId, ClientInfo, NodeId, Position};

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

/// One channel's history, as Redis keeps it (see CLUSTER.md): the
/// position outlives the publications by `meta_ttl`.
struct ChannelHistory {
    epoch: u64,
    top: u64,
    entries: VecDeque<HistoryEntry>,
    /// When the publications expire (`history_ttl` after the last one).
    entries_until: Instant,
    /// When the position expires (a new epoch starts after it).
    until: Instant,
}

impl ChannelHistory {
    fn fresh(now: Instant) -> Self {
        ChannelHistory {
            epoch: super::new_epoch(),
            top: 0,
            entries: VecDeque::new(),
            entries_until: now,
            until: now,
        }
    }
}

/// The histories of every channel that keeps one.
struct Histories {
    channels: HashMap<String, ChannelHistory>,
    meta_ttl: Duration,
    /// Appends since expired channels were last forgotten.
    appends: u32,
}

impl Histories {
    /// `channel`'s history as of `now`: a lost position starts a new epoch,
    /// expired publications are gone.
    fn current(&mut self, channel: &str, now: Instant) -> &mut ChannelHistory {
        // Reads create positions too: expired ones are forgotten now and
        // then, whatever is done.
        self.appends += 1;
        if self.appends >= 1024 {
            self.appends = 0;
            self.channels.retain(|_, h| h.until > now);
        }
        let meta_ttl = self.meta_ttl;
        let history = self
            .channels
            .entry(channel.to_owned())
            .or_insert_with(|| ChannelHistory::fresh(now));
        if history.until <= now && history.top > 0 {
            *history = ChannelHistory::fresh(now);
        }
        if history.entries_until <= now {
            history.entries.clear();
        }
        history.until = now + meta_ttl;
        history
    }

    fn append(
        &mut self,
        channel: &str,
        retention: Retention,
        message: &BusMessage,
    ) -> Option<Position> {
        // (Positions are handed to the nodes with the publication.)
        let BusMessage::Publication {
            priority, frame, ..
        } = message
        else {
            return None;
        };
        let now = Instant::now();
        let history = self.current(channel, now);
        history.top += 1;
        history.entries.push_back(HistoryEntry {
            offset: history.top,
            priority: *priority,
            frame: frame.clone(),
        });
        while history.entries.len() > retention.size as usize {
            history.entries.pop_front();
        }
        history.entries_until = now + retention.ttl;
        Some(Position {
            epoch: history.epoch,
            offset: history.top,
        })
    }

    fn page(&mut self, channel: &str, range: HistoryRange, limit: usize) -> HistoryPage {
        let history = self.current(channel, Instant::now());
        let position = Position {
            epoch: history.epoch,
            offset: history.top,
        };
        match range {
            HistoryRange::Before(before) => {
                let older: Vec<&HistoryEntry> = history
                    .entries
                    .iter()
                    .filter(|e| before.is_none_or(|b| e.offset < b))
                    .collect();
                let skip = older.len().saturating_sub(limit);
                HistoryPage {
                    position,
                    entries: older[skip..].iter().map(|e| (*e).clone()).collect(),
                    more: skip > 0,
                }
            }
            HistoryRange::After(after) => {
                let newer: Vec<&HistoryEntry> = history
                    .entries
                    .iter()
                    .filter(|e| e.offset > after)
                    .collect();
                HistoryPage {
                    position,
                    entries: newer.iter().take(limit).map(|e| (*e).clone()).collect(),
                    more: newer.len() > limit,
                }
            }
        }
    }
}

/// The shared state of in-process nodes.
pub struct MemoryCluster {
    members: RwLock<HashMap<NodeId, Member>>,
    histories: Mutex<Histories>,
    /// Idempotency keys: what each holds, until when.
    once: Mutex<HashMap<String, (String, Instant)>>,
    /// Resumable sessions by client id.
    sessions: Mutex<HashMap<ClientId, Session>>,
}

/// One resumable session, as Redis keeps it (see CLUSTER.md).
struct Session {
    user: Option<String>,
    generation: u64,
    /// The node it is attached to (None: waiting for a resume).
    node: Option<NodeId>,
    /// Direct messages stored while it waits.
    inbox: VecDeque<BusMessage>,
    bytes: usize,
    /// When it is forgotten.
    until: Instant,
    /// How long it waits for a resume once detached.
    window: Duration,
}

impl Session {
    fn detach(&mut self, now: Instant) {
        self.node = None;
        self.until = now + self.window;
    }
}

impl Default for MemoryCluster {
    fn default() -> Self {
        MemoryCluster {
            members: RwLock::default(),
            once: Mutex::default(),
            sessions: Mutex::default(),
            histories: Mutex::new(Histories {
                channels: HashMap::new(),
                meta_ttl: DEFAULT_META_TTL,
                appends: 0,
            }),
        }
    }
}

/// How long a channel's position outlives its last publication unless
/// set otherwise ([`MemoryCluster::set_history_meta_ttl`]).
const DEFAULT_META_TTL: Duration = Duration::from_secs(24 * 3600);

impl MemoryCluster {
    /// An empty cluster.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Sets how long a channel's position outlives its last publication
    /// or read (`history_meta_ttl`).
    pub fn set_history_meta_ttl(&self, ttl: Duration) {
        self.histories().meta_ttl = ttl;
    }

    /// The sessions, without the expired ones.
    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<ClientId, Session>> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        sessions.retain(|_, s| s.until > now);
        sessions
    }

    fn histories(&self) -> std::sync::MutexGuard<'_, Histories> {
        self.histories.lock().unwrap_or_else(|e| e.into_inner())
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

    /// Sets how long a channel's position outlives its last publication
    /// or read (`history_meta_ttl`).
    pub fn set_history_meta_ttl(&self, ttl: Duration) {
        self.cluster.set_history_meta_ttl(ttl);
    }

    fn with_me(&self, change: impl FnOnce(&mut Member)) {
        if let Some(me) = self.cluster.write().get_mut(&self.node_id) {
            change(me);
        }
    }

    fn deliver(
        &self,
        member: &Member,
        node: NodeId,
        message: BusMessage,
        position: Option<Position>,
    ) -> bool {
        let event = match position {
            Some(position) => ClusterEvent::Positioned(message, position),
            None => ClusterEvent::Message(message),
        };
        match member.inbox.try_send(event) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(%node, "in-memory bus: node inbox full, message dropped");
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

impl MemoryBus {
    /// [`ClusterBus::store_direct`], at once.
    fn store(&self, message: BusMessage, limits: SessionLimits) -> Storing {
        let BusMessage::Direct { to, frame, .. } = &message else {
            return Storing::Gone;
        };
        let now = Instant::now();
        let mut sessions = self.cluster.sessions();
        let Some(s) = sessions.get_mut(to) else {
            return Storing::Gone;
        };
        if let Some(node) = s.node {
            if self.cluster.read().contains_key(&node) {
                return Storing::Attached(node);
            }
            // Its node is gone: the session waits for a resume from now on.
            s.detach(now);
        }
        if s.inbox.len() >= limits.inbox_len || s.bytes + frame.len() > limits.inbox_bytes {
            return Storing::Full;
        }
        s.bytes += frame.len();
        s.inbox.push_back(message);
        let left = s.until.saturating_duration_since(now);
        Storing::Stored {
            until_ms: crate::protocol::now_ms() + left.as_millis() as u64,
        }
    }

    /// Hands `message` to the nodes `target` names.
    fn send(
        &self,
        target: Target,
        message: BusMessage,
        position: Option<Position>,
    ) -> Result<usize, BusError> {
        let members = self.cluster.read();
        let outcome = match target {
            Target::AllNodes => {
                // This node counts as reached, as a Redis subscriber does.
                let reached = 1 + members
                    .iter()
                    .filter(|(node, _)| **node != self.node_id)
                    .filter(|(node, member)| {
                        self.deliver(member, **node, message.clone(), position)
                    })
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
                Some(member) if self.deliver(member, node, message, position) => Ok(1),
                Some(_) => Err(BusError::NotListening(node)),
            },
            Target::Channel | Target::History(_) => {
                let wanted = match &message {
                    BusMessage::Publication { channel, event, .. } => {
                        (Feed::of(*event), channel.clone())
                    }
                    _ => (Feed::Publications, String::new()),
                };
                // A history publication comes back to its own node too.
                let echo = matches!(target, Target::History(_));
                Ok(members
                    .iter()
                    .filter(|(node, m)| {
                        (echo || **node != self.node_id) && m.wanted.contains(&wanted)
                    })
                    .filter(|(node, member)| {
                        self.deliver(member, **node, message.clone(), position)
                    })
                    .count())
            }
        };
        drop(members);
        outcome
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

    fn client_left(&self, info: &ClientInfo, session: SessionEnd) {
        self.with_me(|me| {
            me.clients.remove(&info.client_id);
        });
        let (generation, end) = match session {
            SessionEnd::None => return,
            SessionEnd::Detach { generation } => (generation, false),
            SessionEnd::End { generation } => (generation, true),
        };
        let mut sessions = self.cluster.sessions();
        let Some(s) = sessions.get_mut(&info.client_id) else {
            return;
        };
        if s.generation != generation || s.node != Some(self.node_id) {
            // Resumed by another connection since: not this one's to end.
            return;
        }
        if end {
            sessions.remove(&info.client_id);
        } else {
            s.detach(Instant::now());
        }
    }

    fn session_opened(&self, client: ClientId, user: Option<&str>, limits: SessionLimits) {
        self.cluster.sessions().insert(
            client,
            Session {
                user: user.map(str::to_owned),
                generation: 1,
                node: Some(self.node_id),
                inbox: VecDeque::new(),
                bytes: 0,
                until: Instant::now() + limits.lifetime,
                window: limits.window,
            },
        );
    }

    async fn session_claim(
        &self,
        client: ClientId,
        user: Option<&str>,
        generation: u64,
        limits: SessionLimits,
    ) -> Result<Claim, BusError> {
        let mut sessions = self.cluster.sessions();
        let Some(s) = sessions.get_mut(&client) else {
            return Ok(Claim::Gone);
        };
        if s.user.as_deref() != user {
            return Ok(Claim::WrongUser);
        }
        if s.generation != generation {
            return Ok(Claim::Used);
        }
        s.generation += 1;
        let previous = s.node.replace(self.node_id);
        s.until = Instant::now() + limits.lifetime;
        s.window = limits.window;
        s.bytes = 0;
        let stored = std::mem::take(&mut s.inbox).into();
        // Routing follows at once: the client is found here from now on.
        drop(sessions);
        Ok(Claim::Resumed {
            generation: generation + 1,
            stored,
            previous,
        })
    }

    fn store_direct(&self, message: BusMessage, limits: SessionLimits, done: StoreDone) {
        done(Ok(self.store(message, limits)))
    }

    fn session_refreshed(&self, client: ClientId, generation: u64, limits: SessionLimits) {
        if let Some(s) = self.cluster.sessions().get_mut(&client)
            && s.generation == generation
            && s.node == Some(self.node_id)
        {
            s.until = Instant::now() + limits.lifetime;
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
        let outcome = match (target, &message) {
            (Target::History(retention), BusMessage::Publication { channel, .. }) => {
                // Delivered while the histories are held, so every node
                // gets a channel's publications in offset order.
                let mut histories = self.cluster.histories();
                match histories.append(channel, retention, &message) {
                    Some(position) => self.send(target, message, Some(position)),
                    None => Err(BusError::Unavailable("not a publication".into())),
                }
            }
            _ => self.send(target, message, None),
        };
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

    async fn history(
        &self,
        channel: &str,
        range: HistoryRange,
        limit: usize,
    ) -> Result<HistoryPage, BusError> {
        Ok(self.cluster.histories().page(channel, range, limit))
    }

    async fn once_claim(
        &self,
        key: &str,
        pending: &str,
        ttl: Duration,
    ) -> Result<Option<String>, BusError> {
        let now = Instant::now();
        let mut once = self.cluster.once.lock().unwrap_or_else(|e| e.into_inner());
        if once.len() >= 4096 && once.len().is_power_of_two() {
            once.retain(|_, (_, until)| *until > now);
        }
        match once.get(key) {
            Some((held, until)) if *until > now => Ok(Some(held.clone())),
            _ => {
                once.insert(key.to_owned(), (pending.to_owned(), now + ttl));
                Ok(None)
            }
        }
    }

    fn once_settle(&self, key: &str, outcome: String) {
        let mut once = self.cluster.once.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((held, _)) = once.get_mut(key) {
            *held = outcome;
        }
    }

    fn once_release(&self, key: &str, pending: &str) {
        let mut once = self.cluster.once.lock().unwrap_or_else(|e| e.into_inner());
        if once.get(key).is_some_and(|(held, _)| held == pending) {
            once.remove(key);
        }
    }

    async fn follow_history(&self, _channel: &str) -> Result<(), BusError> {
        // In-process delivery has no subscription to drop.
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Priority;

    fn publication(text: &str) -> BusMessage {
        BusMessage::Publication {
            origin: NodeId::new_random(),
            channel: "h".into(),
            priority: Priority::Normal,
            event: false,
            frame: bytes::Bytes::copy_from_slice(text.as_bytes()),
        }
    }

    /// Publications expire `ttl` after the last one, the position later
    /// (`meta_ttl`, refreshed by reads too); then a new epoch starts.
    #[tokio::test(start_paused = true)]
    async fn publications_expire_before_the_position_which_then_starts_an_epoch() {
        let mut histories = Histories {
            channels: HashMap::new(),
            meta_ttl: Duration::from_secs(100),
            appends: 0,
        };
        let retention = Retention {
            size: 2,
            ttl: Duration::from_secs(10),
        };
        for text in ["a", "b", "c"] {
            histories
                .append("h", retention, &publication(text))
                .unwrap();
        }
        let page = histories.page("h", HistoryRange::Before(None), 10);
        let epoch = page.position.epoch;
        assert_eq!(page.position.offset, 3);
        assert_eq!(
            page.entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
            [2, 3]
        );
        tokio::time::advance(Duration::from_secs(11)).await;
        let page = histories.page("h", HistoryRange::Before(None), 10);
        assert_eq!((page.position.epoch, page.position.offset), (epoch, 3));
        assert!(page.entries.is_empty(), "expired with the TTL");
        let next = histories.append("h", retention, &publication("d")).unwrap();
        assert_eq!((next.epoch, next.offset), (epoch, 4), "the epoch goes on");
        // Reads keep the position alive; without any, it expires.
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(
            histories
                .page("h", HistoryRange::Before(None), 10)
                .position
                .epoch,
            epoch
        );
        tokio::time::advance(Duration::from_secs(101)).await;
        let page = histories.page("h", HistoryRange::Before(None), 10);
        assert_ne!(page.position.epoch, epoch, "a lost position is a new epoch");
        assert_eq!(page.position.offset, 0);
        let next = histories.append("h", retention, &publication("e")).unwrap();
        assert_eq!((next.epoch, next.offset), (page.position.epoch, 1));
    }
}
