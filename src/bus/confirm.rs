//! End-to-end confirmation of broadcasts over Redis: why a broadcast's
//! Ack can be trusted even when a node's subscription is closed with
//! messages still in Redis's output buffer for it (Redis counted them as
//! received when they were published, then threw them away).
//!
//! Every broadcast a node publishes carries the node's *epoch* (random per
//! process) and a sequence number. Each receiving node remembers, per
//! origin, the highest sequence number up to which it received every
//! broadcast, and tells the origin so ([`Incoming`]: a `Confirm` now and
//! then, one per origin, however many broadcasts it covers); a jump in the
//! sequence means it missed some, which it reports at once (`Missed`).
//! The origin ([`Outgoing`]) answers a broadcast's sender only when every
//! node that was alive when it was published confirmed it, when one of
//! them missed it, or when it gave up waiting. This module is the
//! bookkeeping only; `redis_bus` does the I/O.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use super::{BusError, PublishDone};
use crate::protocol::NodeId;

/// A broadcast published and not yet confirmed by every node it must reach.
struct Awaiting {
    done: PublishDone,
    /// Nodes that have neither confirmed nor missed it yet.
    nodes: Vec<NodeId>,
    /// Nodes it was published to, this one included (for the answer).
    reached: usize,
    since: Instant,
}

/// How long a reported gap is remembered: far longer than a publish takes
/// to come back from Redis.
const MISSED_KEEP: Duration = Duration::from_secs(30);

/// Most gaps remembered per node.
const MISSED_MAX: usize = 256;

/// A sender's answer, to be given outside any lock.
pub(super) type Answer = (PublishDone, Result<usize, BusError>);

/// The origin's side: its epoch, the next sequence number, and the
/// broadcasts waiting for confirmations.
pub(super) struct Outgoing {
    epoch: u64,
    next: u64,
    /// Most broadcasts waiting at once; beyond it they fail at once
    /// ([`BusError::Backlog`]) instead of growing memory.
    max_awaiting: usize,
    awaiting: BTreeMap<u64, Awaiting>,
    /// Per node, up to which sequence number it confirmed everything.
    confirmed: HashMap<NodeId, u64>,
    /// Per node, ranges it reported missed and when, for broadcasts whose
    /// publish outcome comes after the report (kept for [`MISSED_KEEP`]).
    missed: HashMap<NodeId, Vec<(u64, u64, Instant)>>,
}

impl Outgoing {
    /// A fresh sequence for this process, with at most `max_awaiting`
    /// broadcasts waiting for confirmations at once.
    pub(super) fn new(epoch: u64, max_awaiting: usize) -> Self {
        Outgoing {
            epoch,
            next: 1,
            max_awaiting,
            awaiting: BTreeMap::new(),
            confirmed: HashMap::new(),
            missed: HashMap::new(),
        }
    }

    /// This process's epoch.
    pub(super) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The sequence number of the next broadcast.
    pub(super) fn number(&mut self) -> u64 {
        let seq = self.next;
        self.next += 1;
        seq
    }

    /// Broadcast `seq` was published to `nodes` (the other live nodes);
    /// answers `done` at once when nothing is left to wait for.
    pub(super) fn expect(
        &mut self,
        seq: u64,
        done: PublishDone,
        mut nodes: Vec<NodeId>,
        now: Instant,
    ) -> Option<Answer> {
        let reached = nodes.len() + 1;
        if let Some(node) = nodes.iter().copied().find(|n| self.has_missed(*n, seq)) {
            return Some((done, Err(missed_by(node))));
        }
        nodes.retain(|n| self.confirmed.get(n).is_none_or(|upto| *upto < seq));
        if nodes.is_empty() {
            return Some((done, Ok(reached)));
        }
        if self.awaiting.len() >= self.max_awaiting {
            return Some((done, Err(BusError::Backlog)));
        }
        self.awaiting.insert(
            seq,
            Awaiting {
                done,
                nodes,
                reached,
                since: now,
            },
        );
        None
    }

    fn has_missed(&self, node: NodeId, seq: u64) -> bool {
        self.missed
            .get(&node)
            .is_some_and(|ranges| ranges.iter().any(|(a, b, _)| (*a..=*b).contains(&seq)))
    }

    /// `from` received every broadcast of this epoch up to `upto`.
    pub(super) fn confirm(&mut self, from: NodeId, upto: u64) -> Vec<Answer> {
        let seen = self.confirmed.entry(from).or_insert(0);
        *seen = (*seen).max(upto);
        let mut answers = Vec::new();
        let done: Vec<u64> = self
            .awaiting
            .range_mut(..=upto)
            .filter_map(|(seq, a)| {
                a.nodes.retain(|n| *n != from);
                a.nodes.is_empty().then_some(*seq)
            })
            .collect();
        for seq in done {
            if let Some(a) = self.awaiting.remove(&seq) {
                answers.push((a.done, Ok(a.reached)));
            }
        }
        answers
    }

    /// `from` missed broadcasts `first..=last` of this epoch.
    pub(super) fn missed(&mut self, from: NodeId, first: u64, last: u64) -> Vec<Answer> {
        let now = Instant::now();
        let ranges = self.missed.entry(from).or_default();
        ranges.retain(|(_, _, at)| now.saturating_duration_since(*at) < MISSED_KEEP);
        if ranges.len() >= MISSED_MAX {
            ranges.remove(0);
        }
        ranges.push((first, last, now));
        let failed: Vec<u64> = self
            .awaiting
            .range(first..=last)
            .filter(|(_, a)| a.nodes.contains(&from))
            .map(|(seq, _)| *seq)
            .collect();
        failed
            .into_iter()
            .filter_map(|seq| self.awaiting.remove(&seq))
            .map(|a| (a.done, Err(missed_by(from))))
            .collect()
    }

    /// `node` left the cluster or died: nothing more is awaited from it.
    pub(super) fn forget(&mut self, node: NodeId) -> Vec<Answer> {
        self.confirmed.remove(&node);
        self.missed.remove(&node);
        let done: Vec<u64> = self
            .awaiting
            .iter_mut()
            .filter_map(|(seq, a)| {
                a.nodes.retain(|n| *n != node);
                a.nodes.is_empty().then_some(*seq)
            })
            .collect();
        done.into_iter()
            .filter_map(|seq| self.awaiting.remove(&seq))
            .map(|a| (a.done, Ok(a.reached)))
            .collect()
    }

    /// Nodes still awaited by broadcasts waiting longer than `timeout`.
    pub(super) fn overdue(&self, now: Instant, timeout: Duration) -> Vec<NodeId> {
        let mut nodes: Vec<NodeId> = self
            .awaiting
            .values()
            .filter(|a| now.saturating_duration_since(a.since) >= timeout)
            .flat_map(|a| a.nodes.iter().copied())
            .collect();
        nodes.sort();
        nodes.dedup();
        nodes
    }

    /// Settles the broadcasts waiting longer than `timeout`: nodes not in
    /// `alive` are gone and no longer awaited; one still alive that has not
    /// confirmed makes the broadcast fail.
    pub(super) fn expire(
        &mut self,
        now: Instant,
        timeout: Duration,
        alive: &[NodeId],
    ) -> Vec<Answer> {
        let overdue: Vec<u64> = self
            .awaiting
            .iter()
            .filter(|(_, a)| now.saturating_duration_since(a.since) >= timeout)
            .map(|(seq, _)| *seq)
            .collect();
        overdue
            .into_iter()
            .filter_map(|seq| self.awaiting.remove(&seq))
            .map(|a| {
                let unconfirmed = a.nodes.iter().filter(|n| alive.contains(n)).count();
                let result = if unconfirmed == 0 {
                    Ok(a.reached)
                } else {
                    Err(BusError::Unconfirmed {
                        unconfirmed,
                        reached: a.reached,
                    })
                };
                (a.done, result)
            })
            .collect()
    }

    /// Broadcasts still waiting.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.awaiting.len()
    }
}

fn missed_by(node: NodeId) -> BusError {
    BusError::Missed(node)
}

/// Where a receiver is with one origin's broadcasts.
#[derive(Debug, Clone, Copy)]
struct Progress {
    epoch: u64,
    /// Highest sequence number seen (a gap before it was reported).
    seen: u64,
    /// Highest sequence number handed to the node: what may be confirmed.
    handed: u64,
}

/// The receiving side: per origin, up to where every broadcast arrived,
/// and which origins are owed a confirmation.
#[derive(Default)]
pub(super) struct Incoming {
    origins: HashMap<NodeId, Progress>,
    /// Origins owed a `Confirm`.
    due: Vec<NodeId>,
}

/// What a received broadcast tells the receiver to report.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Arrival {
    /// In order (or the first from this origin's epoch): confirm in time.
    InOrder,
    /// Broadcasts `first..=last` never arrived: report them missed.
    Gap(u64, u64),
    /// Already counted (or from before the origin's current epoch): ignore.
    Stale,
}

impl Incoming {
    /// Records that broadcast `seq` of `origin`'s `epoch` arrived.
    pub(super) fn arrived(&mut self, origin: NodeId, epoch: u64, seq: u64) -> Arrival {
        let (arrival, handed) = match self.origins.get(&origin) {
            Some(p) if p.epoch == epoch && seq <= p.seen => return Arrival::Stale,
            Some(p) if p.epoch == epoch && seq > p.seen + 1 => {
                (Arrival::Gap(p.seen + 1, seq - 1), p.handed)
            }
            Some(p) if p.epoch == epoch => (Arrival::InOrder, p.handed),
            // The first from this epoch: whatever came before was not
            // published to this node (it was not a member yet).
            _ => (Arrival::InOrder, seq - 1),
        };
        self.origins.insert(
            origin,
            Progress {
                epoch,
                seen: seq,
                handed,
            },
        );
        arrival
    }

    /// Records that broadcast `seq` of `origin` was handed to the node, so
    /// it may be confirmed.
    pub(super) fn handed(&mut self, origin: NodeId, seq: u64) {
        if let Some(p) = self.origins.get_mut(&origin)
            && p.handed < seq
        {
            p.handed = seq;
            if !self.due.contains(&origin) {
                self.due.push(origin);
            }
        }
    }

    /// The confirmations owed: (origin, epoch, up to).
    pub(super) fn take_due(&mut self) -> Vec<(NodeId, u64, u64)> {
        self.due
            .drain(..)
            .filter_map(|origin| {
                self.origins
                    .get(&origin)
                    .map(|p| (origin, p.epoch, p.handed))
            })
            .collect()
    }

    /// Forgets an origin that left the cluster.
    pub(super) fn forget(&mut self, origin: NodeId) {
        self.origins.remove(&origin);
        self.due.retain(|o| *o != origin);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    type Log = Arc<Mutex<Vec<(u64, Result<usize, BusError>)>>>;

    fn done(log: &Log, seq: u64) -> PublishDone {
        let log = log.clone();
        Box::new(move |r| log.lock().unwrap().push((seq, r)))
    }

    fn answer(answers: Vec<Answer>) {
        for (done, result) in answers {
            done(result);
        }
    }

    #[test]
    fn a_broadcast_is_answered_once_every_node_confirmed_it() {
        let (a, b) = (NodeId::new_random(), NodeId::new_random());
        let log = Log::default();
        let now = Instant::now();
        let mut out = Outgoing::new(7, 100);
        let (s1, s2) = (out.number(), out.number());
        assert!(out.expect(s1, done(&log, s1), vec![a, b], now).is_none());
        assert!(out.expect(s2, done(&log, s2), vec![a, b], now).is_none());
        answer(out.confirm(a, s2));
        assert!(log.lock().unwrap().is_empty(), "b has not confirmed");
        answer(out.confirm(b, s1));
        assert_eq!(*log.lock().unwrap(), vec![(s1, Ok(3))]);
        // A confirmation that came before the publish outcome counts too.
        let s3 = out.number();
        answer(out.confirm(a, s3));
        answer(out.confirm(b, s3));
        assert!(out.expect(s3, done(&log, s3), vec![a, b], now).is_some());
        answer(out.confirm(b, s2));
        assert_eq!(log.lock().unwrap().len(), 2);
        assert_eq!(out.waiting(), 0);
    }

    #[test]
    fn a_missed_broadcast_fails_even_when_reported_first() {
        let (a, b) = (NodeId::new_random(), NodeId::new_random());
        let log = Log::default();
        let now = Instant::now();
        let mut out = Outgoing::new(7, 100);
        let s1 = out.number();
        assert!(out.expect(s1, done(&log, s1), vec![a, b], now).is_none());
        answer(out.missed(b, s1, s1));
        assert_eq!(*log.lock().unwrap(), vec![(s1, Err(BusError::Missed(b)))]);
        let s2 = out.number();
        answer(out.missed(a, s2, s2));
        let (d, r) = out.expect(s2, done(&log, s2), vec![a, b], now).unwrap();
        d(r);
        assert_eq!(log.lock().unwrap()[1], (s2, Err(BusError::Missed(a))));
    }

    #[test]
    fn overdue_broadcasts_wait_only_for_nodes_still_alive() {
        let (a, b) = (NodeId::new_random(), NodeId::new_random());
        let log = Log::default();
        let now = Instant::now();
        let timeout = Duration::from_secs(5);
        let mut out = Outgoing::new(7, 100);
        let s1 = out.number();
        assert!(out.expect(s1, done(&log, s1), vec![a], now).is_none());
        let s2 = out.number();
        assert!(out.expect(s2, done(&log, s2), vec![b], now).is_none());
        assert!(out.overdue(now, timeout).is_empty());
        let later = now + timeout;
        assert_eq!(out.overdue(later, timeout).len(), 2);
        // a died; b is alive and silent.
        answer(out.expire(later, timeout, &[b]));
        let log = log.lock().unwrap();
        assert_eq!(log[0], (s1, Ok(2)));
        assert_eq!(
            log[1],
            (
                s2,
                Err(BusError::Unconfirmed {
                    unconfirmed: 1,
                    reached: 2
                })
            )
        );
    }

    #[test]
    fn a_node_that_left_is_no_longer_awaited() {
        let (a, b) = (NodeId::new_random(), NodeId::new_random());
        let log = Log::default();
        let mut out = Outgoing::new(7, 100);
        let s1 = out.number();
        assert!(
            out.expect(s1, done(&log, s1), vec![a, b], Instant::now())
                .is_none()
        );
        answer(out.confirm(a, s1));
        answer(out.forget(b));
        assert_eq!(*log.lock().unwrap(), vec![(s1, Ok(3))]);
    }

    #[test]
    fn the_receiver_confirms_in_order_and_reports_gaps() {
        let origin = NodeId::new_random();
        let mut inc = Incoming::default();
        assert_eq!(inc.arrived(origin, 1, 5), Arrival::InOrder, "first seen");
        inc.handed(origin, 5);
        assert_eq!(inc.arrived(origin, 1, 6), Arrival::InOrder);
        // Not confirmed before it was handed to the node.
        assert_eq!(inc.take_due(), vec![(origin, 1, 5)]);
        inc.handed(origin, 6);
        assert_eq!(inc.arrived(origin, 1, 6), Arrival::Stale);
        assert_eq!(inc.arrived(origin, 1, 9), Arrival::Gap(7, 8));
        inc.handed(origin, 9);
        assert_eq!(inc.take_due(), vec![(origin, 1, 9)]);
        assert!(inc.take_due().is_empty());
        // A restarted origin starts a new epoch.
        assert_eq!(inc.arrived(origin, 2, 1), Arrival::InOrder);
        inc.handed(origin, 1);
        assert_eq!(inc.take_due(), vec![(origin, 2, 1)]);
    }
}
