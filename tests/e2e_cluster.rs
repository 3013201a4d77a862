//! End-to-end check of the docker-compose cluster behind the UDP load
//! balancer. Ignored by `cargo test`: `cluster/e2e.sh` starts the cluster,
//! runs this with `--ignored`, and tears it down. It talks to the cluster
//! only through the load balancer's published loopback port.
//!
//! Environment (set by e2e.sh): FABRIC_E2E_SERVER (LB address),
//! FABRIC_E2E_CA (CA file), FABRIC_E2E_PROJECT (compose project name).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use quic_fabric::client::{Client, ClientConfig, ClientError, Event, ReconnectPolicy};
use quic_fabric::protocol::{ClientId, Frame, MessageId, NodeId, Payload, Priority, error_code};

const STEP_TIMEOUT: Duration = Duration::from_secs(90);

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set; run cluster/e2e.sh"))
}

fn config(name: &str) -> ClientConfig {
    let mut config = ClientConfig::new(env("FABRIC_E2E_SERVER"), env("FABRIC_E2E_CA"))
        .name(name)
        .reconnect(ReconnectPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            max_attempts: None,
        });
    config.connect_timeout = Duration::from_secs(2);
    // Notice a dead node quickly: two missed keep-alives.
    config.keep_alive_interval = Duration::from_secs(1);
    config.idle_timeout = Duration::from_secs(4);
    config
}

fn docker(args: &[&str]) -> String {
    let out = std::process::Command::new("docker")
        .args(args)
        .output()
        .expect("docker runs");
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn container(service: &str) -> String {
    let project = env("FABRIC_E2E_PROJECT");
    let id = docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=com.docker.compose.project={project}"),
        "--filter",
        &format!("label=com.docker.compose.service={service}"),
    ]);
    assert!(!id.is_empty(), "no container for service {service}");
    id
}

struct Peer {
    client: Client,
    /// Compose service (= node name) it is connected to.
    node: String,
    node_id: NodeId,
}

impl Peer {
    async fn connect(name: &str) -> Peer {
        let client = tokio::time::timeout(STEP_TIMEOUT, async {
            loop {
                match Client::connect(&config(name)).await {
                    Ok(c) => return c,
                    Err(err) => eprintln!("  connect {name}: {err}; retrying"),
                }
            }
        })
        .await
        .expect("client connects through the LB");
        let hs = client.handshake();
        Peer {
            node: hs.server_name,
            node_id: hs.node_id,
            client,
        }
    }

    /// Next frame; panics on disconnects (for clients that must not notice anything).
    async fn frame(&mut self) -> Frame {
        match tokio::time::timeout(STEP_TIMEOUT, self.client.next_event())
            .await
            .expect("event in time")
        {
            Some(Event::Frame(f)) => f,
            other => panic!("client on {} was disturbed: {other:?}", self.node),
        }
    }

    async fn expect(&mut self, id: MessageId) -> Frame {
        loop {
            let f = self.frame().await;
            if f.id == id {
                return f;
            }
        }
    }
}

/// `id` arrives exactly once before `fence` (sent after it by the same
/// sender at the same priority, so it cannot overtake a duplicate).
async fn exactly_once(peer: &mut Peer, id: MessageId, fence: MessageId) {
    let mut seen = 0;
    loop {
        let f = peer.frame().await;
        if f.id == id {
            seen += 1;
        }
        if f.id == fence {
            break;
        }
    }
    assert_eq!(
        seen, 1,
        "broadcast delivered {seen} times to a client on {}",
        peer.node
    );
}

async fn list(client: &Client) -> Vec<(ClientId, NodeId)> {
    let (clients, truncated) = client.list().await.expect("list");
    assert!(!truncated);
    clients.iter().map(|c| (c.client_id, c.node_id)).collect()
}

#[tokio::test]
#[ignore = "needs the compose cluster: run cluster/e2e.sh"]
async fn compose_cluster_end_to_end() {
    // Step 2: clients spread over nodes.
    let t = Instant::now();
    let mut peers = Vec::new();
    while peers.len() < 8
        || (peers
            .iter()
            .map(|p: &Peer| &p.node)
            .collect::<std::collections::HashSet<_>>()
            .len()
            < 2
            && peers.len() < 30)
    {
        peers.push(Peer::connect(&format!("e2e-{}", peers.len())).await);
    }
    let mut spread: BTreeMap<String, usize> = BTreeMap::new();
    for p in &peers {
        *spread.entry(p.node.clone()).or_default() += 1;
    }
    assert!(
        spread.len() >= 2,
        "all clients landed on one node: {spread:?}"
    );
    println!(
        "e2e step 2/6 PASS {} clients through the LB landed on {} nodes {spread:?} ({:.1}s)",
        peers.len(),
        spread.len(),
        t.elapsed().as_secs_f64()
    );

    // Step 3: broadcast exactly once, direct across nodes, list.
    let t = Instant::now();
    let sender_node = peers[0].node.clone();
    let b1 = peers[0]
        .client
        .broadcast(Payload::Text("hello cluster".into()), Priority::Normal)
        .await
        .unwrap();
    let fence = peers[0]
        .client
        .broadcast(Payload::Text("fence".into()), Priority::Normal)
        .await
        .unwrap();
    for p in peers.iter_mut().skip(1) {
        exactly_once(p, b1, fence).await;
    }
    let far = peers
        .iter()
        .position(|p| p.node != sender_node)
        .expect("a client on another node");
    let to = peers[far].client.client_id();
    let d = peers[0]
        .client
        .direct(to, Payload::Text("across".into()), Priority::High)
        .await
        .unwrap();
    let got = peers[far].expect(d).await;
    assert_eq!(got.sender.unwrap().node_id, peers[0].node_id);
    let listed: HashMap<ClientId, NodeId> = list(&peers[far].client).await.into_iter().collect();
    for p in &peers {
        assert_eq!(
            listed.get(&p.client.client_id()),
            Some(&p.node_id),
            "list shows {} on {}",
            p.client.client_id(),
            p.node
        );
    }
    assert_eq!(
        listed.len(),
        peers.len(),
        "list shows exactly the connected clients"
    );
    println!(
        "e2e step 3/6 PASS broadcast reached {} clients exactly once, direct {} -> {} delivered, list shows all {} with their nodes ({:.1}s)",
        peers.len() - 1,
        sender_node,
        peers[far].node,
        listed.len(),
        t.elapsed().as_secs_f64()
    );

    // Step 4: kill the sender's node.
    let t = Instant::now();
    let victim_node = sender_node.clone();
    let victim_id = peers[0].node_id;
    let (mut victims, mut survivors): (Vec<Peer>, Vec<Peer>) =
        peers.into_iter().partition(|p| p.node == victim_node);
    docker(&["kill", &container(&victim_node)]);
    let killed = Instant::now();
    let observer = &survivors[0].client;
    let deadline = Instant::now() + STEP_TIMEOUT;
    while list(observer).await.iter().any(|(_, n)| *n == victim_id) {
        assert!(
            Instant::now() < deadline,
            "dead node's clients still listed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let presence_gone = killed.elapsed();
    for v in victims.iter_mut() {
        let reconnected = tokio::time::timeout(STEP_TIMEOUT, async {
            loop {
                match v.client.next_event().await {
                    Some(Event::Reconnected { client_id, node_id }) => return (client_id, node_id),
                    Some(Event::Frame(_) | Event::Disconnected { .. }) => {}
                    other => panic!("victim client ended: {other:?}"),
                }
            }
        })
        .await
        .expect("victim reconnects");
        assert_ne!(reconnected.1, victim_id, "reconnected to the dead node?");
        v.node = v.client.handshake().server_name;
        v.node_id = reconnected.1;
    }
    for v in victims.iter_mut() {
        let id = survivors[0]
            .client
            .direct(
                v.client.client_id(),
                Payload::Text("welcome back".into()),
                Priority::Normal,
            )
            .await
            .unwrap();
        v.expect(id).await;
    }
    println!(
        "e2e step 4/6 PASS killed {victim_node}: presence gone after {:.1}s, {} clients reconnected to {:?} and receive directs, {} clients elsewhere undisturbed ({:.1}s)",
        presence_gone.as_secs_f64(),
        victims.len(),
        victims.iter().map(|v| v.node.as_str()).collect::<Vec<_>>(),
        survivors.len(),
        t.elapsed().as_secs_f64()
    );

    // Step 5: Redis restart.
    let t = Instant::now();
    let mut all: Vec<Peer> = survivors.drain(..).chain(victims.drain(..)).collect();
    let a = 0;
    let b = match all.iter().position(|p| p.node != all[0].node) {
        Some(b) => b,
        None => {
            // Everyone is on one node now: add a client until one lands elsewhere.
            loop {
                let p = Peer::connect("e2e-extra").await;
                if p.node != all[0].node {
                    all.push(p);
                    break all.len() - 1;
                }
            }
        }
    };
    let redis = container("redis");
    docker(&["stop", "-t", "1", &redis]);
    let to = all[b].client.client_id();
    let outage = all[a]
        .client
        .direct(to, Payload::Text("during outage".into()), Priority::Normal)
        .await;
    assert!(
        matches!(&outage, Err(ClientError::Server { code, .. }) if *code == error_code::CLUSTER_UNAVAILABLE),
        "cross-node send during the outage must fail visibly: {outage:?}"
    );
    docker(&["start", &redis]);
    let restarted = Instant::now();
    let deadline = Instant::now() + STEP_TIMEOUT;
    let id = loop {
        match all[a]
            .client
            .direct(to, Payload::Text("after outage".into()), Priority::Normal)
            .await
        {
            Ok(id) => break id,
            Err(ClientError::Server { code, .. })
                if code == error_code::CLUSTER_UNAVAILABLE
                    || code == error_code::UNKNOWN_CLIENT =>
            {
                assert!(Instant::now() < deadline, "delivery did not resume");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(err) => panic!("unexpected error: {err}"),
        }
    };
    let resumed = restarted.elapsed();
    all[b].expect(id).await;
    // Nobody was disconnected by the Redis outage.
    for p in all.iter_mut() {
        let probe = p
            .client
            .send_text("still here")
            .await
            .expect("client still connected");
        p.expect(probe).await;
    }
    println!(
        "e2e step 5/6 PASS Redis stopped and restarted: cross-node send failed visibly during the outage, delivery resumed {:.1}s after restart, no client disconnected ({:.1}s)",
        resumed.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
}
