//! Three nodes in one process over the in-memory bus: the cluster logic
//! (presence, cross-node broadcast and direct, node departure) without
//! Redis. The scenarios are shared with `tests/cluster_redis.rs`
//! (`tests/common/scenarios.rs`).

mod common;

use common::cluster::MemoryNodes;

cluster_scenarios!(MemoryNodes);
