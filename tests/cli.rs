//! The `fabric` and `fabric-node` binaries, run as a user would.

mod common;

use std::process::Stdio;

use common::{NodeProcess, TestNode, WAIT, next_matching};
use quic_fabric::client::Client;
use quic_fabric::protocol::{Body, ClientId, Payload, Priority};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

fn fabric(node: &TestNode) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fabric"));
    cmd.arg("--server")
        .arg(node.addr.to_string())
        .arg("--ca")
        .arg(&node.ca)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

async fn output(mut cmd: Command) -> std::process::Output {
    tokio::time::timeout(WAIT, cmd.output())
        .await
        .expect("command finishes")
        .unwrap()
}

/// Asserts the command exited 0, showing its stderr if not.
fn assert_success(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The stdout of a running `fabric`, read line by line, each line within
/// [`WAIT`].
struct Stdout(tokio::io::Lines<BufReader<ChildStdout>>);

impl Stdout {
    fn of(child: &mut Child) -> Stdout {
        Stdout(BufReader::new(child.stdout.take().expect("stdout piped")).lines())
    }

    async fn line(&mut self) -> String {
        tokio::time::timeout(WAIT, self.0.next_line())
            .await
            .expect("a line in time")
            .unwrap()
            .expect("a line before the end of the output")
    }

    async fn json(&mut self) -> Value {
        let line = self.line().await;
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    /// The first line containing `text`, skipping the lines before it.
    async fn find(&mut self, text: &str) -> String {
        loop {
            let line = self.line().await;
            if line.contains(text) {
                return line;
            }
        }
    }
}

async fn exits(child: &mut Child) -> std::process::ExitStatus {
    tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("the command exits in time")
        .unwrap()
}

/// Asserts the command exited 1 with one line on stderr containing every
/// one of `needles`.
fn assert_fails_with(out: &std::process::Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    }
}

const JWT_SECRET: &str = "cli-test-secret-0123456789abcdef-0123";

fn token(user: &str) -> String {
    quic_fabric::auth::mint_hs256(
        JWT_SECRET,
        user,
        std::time::Duration::from_secs(600),
        None,
        None,
        &[],
    )
    .unwrap()
}

/// A library client of `user` on a node that verifies [`JWT_SECRET`] tokens.
async fn connect_as(node: &TestNode, name: &str, user: &str) -> Client {
    let mut config = node.client_config(name);
    config.token = Some(token(user));
    Client::connect(&config).await.unwrap()
}

/// A `fabric-node` process logging JSON lines (kept for
/// [`NodeProcess::terminate`]) that drains for at most a second on SIGTERM.
async fn json_logging_node(certs: &std::path::Path, args: &[&str]) -> NodeProcess {
    let args = [args, &["--shutdown-grace", "1s", "--log-format", "json"]].concat();
    NodeProcess::start_logging(certs, &args).await
}

#[tokio::test]
async fn send_exits_zero_once_acknowledged_and_the_target_receives() {
    let node = TestNode::start().await;
    let mut bob = node.connect("bob").await;
    let mut cmd = fabric(&node);
    cmd.args([
        "--name",
        "cli",
        "send",
        "--to",
        &bob.client_id().to_string(),
        "hello bob",
    ]);
    let out = output(cmd).await;
    assert_success(&out);
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["type"], "ack");
    let got = next_matching(&mut bob, |f| matches!(f.body, Body::Direct { .. })).await;
    assert_eq!(
        got.body,
        Body::Direct {
            to: bob.client_id(),
            payload: Payload::Text("hello bob".into())
        }
    );
    assert_eq!(got.sender.unwrap().name, "cli");
}

#[tokio::test]
async fn send_to_an_unknown_client_fails_with_one_clear_line() {
    let node = TestNode::start().await;
    let mut cmd = fabric(&node);
    cmd.args([
        "send",
        "--to",
        &ClientId::new_random().to_string(),
        "anyone?",
    ]);
    let out = output(cmd).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("no client with id"), "{stderr}");
}

#[tokio::test]
async fn a_missing_ca_file_is_a_clear_error() {
    let node = TestNode::start().await;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fabric"));
    cmd.args([
        "--server",
        &node.addr.to_string(),
        "--ca",
        "/nonexistent/ca.pem",
        "list",
    ]);
    let out = output(cmd).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/ca.pem"));
}

#[tokio::test]
async fn listen_prints_connected_then_one_json_object_per_frame() {
    let node = TestNode::start().await;
    let mut cmd = fabric(&node);
    cmd.args(["listen", "--count", "1"]).stdout(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let connected: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!(connected["type"], "connected");
    let listener_id: ClientId = connected["client_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(connected["node_id"], node.id().to_string());

    let alice = node.connect("alice").await;
    alice
        .direct(
            listener_id,
            Payload::Text("for the script".into()),
            Priority::Low,
        )
        .await
        .unwrap();
    let second = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let frame: serde_json::Value = serde_json::from_str(&second).unwrap();
    assert_eq!(frame["type"], "direct");
    assert_eq!(frame["text"], "for the script");
    assert_eq!(frame["priority"], "low");
    assert_eq!(frame["from"]["name"], "alice");
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "listen --count 1 exits 0 after one frame");
}

#[tokio::test]
async fn list_and_stats_print_json() {
    let node = TestNode::start().await;
    let _alice = node.connect("alice").await;
    let mut cmd = fabric(&node);
    cmd.arg("list");
    let out = output(cmd).await;
    assert_success(&out);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = list["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"alice") && names.contains(&"fabric-cli"),
        "{names:?}"
    );

    let mut cmd = fabric(&node);
    cmd.arg("stats");
    let out = output(cmd).await;
    assert_success(&out);
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["node_id"], node.id().to_string());
    assert!(stats["clients_connected"].as_u64().unwrap() >= 2);
}

#[tokio::test]
async fn chat_broadcasts_typed_lines_and_quits() {
    let node = TestNode::start().await;
    let mut bob = node.connect("bob").await;
    let mut cmd = fabric(&node);
    cmd.args(["--name", "typist", "chat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"hello from chat\n/ping\n/list\n")
        .await
        .unwrap();
    let got = next_matching(&mut bob, |f| matches!(f.body, Body::Broadcast { .. })).await;
    assert_eq!(
        got.body,
        Body::Broadcast {
            payload: Payload::Text("hello from chat".into())
        }
    );
    assert_eq!(got.sender.unwrap().name, "typist");
    // Incoming messages are shown with the sender's name.
    bob.broadcast(Payload::Text("hi typist".into()), Priority::Normal)
        .await
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("[bob] hi typist") {
                return;
            }
        }
        panic!("chat output ended without bob's message");
    })
    .await
    .expect("bob's message shown");
    stdin.write_all(b"/quit\n").await.unwrap();
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn fabric_node_generates_certs_serves_and_stops_on_sigterm() {
    let certs = tempfile::tempdir().unwrap();
    let node = json_logging_node(certs.path(), &["--name", "proc-node"]).await;
    let client = node.connect("client").await;
    assert_eq!(client.handshake().server_name, "proc-node");
    for file in ["ca.pem", "server.pem", "server.key", "ca.key"] {
        assert!(certs.path().join(file).exists(), "{file} generated");
    }
    let out = node.terminate().await;
    assert!(out.status.success(), "graceful exit: {:?}", out.status);
    drop(client);

    // Machine-readable logs: one JSON object per line; the connection's
    // open and close lines carry its span (remote, node id, client id).
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let find = |message: &str| {
        lines
            .iter()
            .find(|l| l["fields"]["message"] == message)
            .unwrap_or_else(|| panic!("no {message:?} line in {lines:#?}"))
            .clone()
    };
    let opened = find("client connected");
    let closed = find("connection closed");
    for line in [&opened, &closed] {
        let span = &line["span"];
        assert_eq!(span["name"], "conn");
        assert!(
            span["remote"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{line}"
        );
        assert_eq!(span["node_id"].as_str().unwrap().len(), 36, "{line}");
        assert_eq!(span["client_id"].as_str().unwrap().len(), 36, "{line}");
    }
    assert_eq!(opened["span"]["client_id"], closed["span"]["client_id"]);
    assert_eq!(closed["fields"]["code"], 1, "closed by the drain: {closed}");
    assert!(closed["fields"]["duration_ms"].is_u64(), "{closed}");
    assert!(closed["fields"]["reason"].is_string(), "{closed}");
    find("draining: refusing new connections, asking clients to reconnect elsewhere");
}

#[tokio::test]
async fn fabric_node_health_probes_without_becoming_a_client_and_gen_certs_is_idempotent() {
    let node = TestNode::start().await;
    let health = |server: String, ca: std::path::PathBuf| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fabric-node"));
        cmd.args([
            "health",
            "--server",
            &server,
            "--server-name",
            "localhost",
            "--timeout",
            "2s",
            "--ca",
        ])
        .arg(ca)
        .kill_on_drop(true);
        cmd
    };
    let out = output(health(node.addr.to_string(), node.ca.clone())).await;
    assert_success(&out);
    assert_eq!(
        node.stats()
            .connections_total
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    let watcher = node.connect("watcher").await;
    let (clients, _) = watcher.list().await.unwrap();
    assert_eq!(clients.len(), 1, "the probe never appears as a client");

    // Nobody there: non-zero exit and a reason.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let out = output(health(
        silent.local_addr().unwrap().to_string(),
        node.ca.clone(),
    ))
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unhealthy"));

    let dir = tempfile::tempdir().unwrap();
    let gen_certs = |dir: &std::path::Path| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fabric-node"));
        cmd.args(["gen-certs", "--cert-names", "localhost,lb", "--certs"])
            .arg(dir);
        cmd
    };
    assert!(output(gen_certs(dir.path())).await.status.success());
    let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
    let cert = std::fs::read(dir.path().join("server.pem")).unwrap();
    assert!(output(gen_certs(dir.path())).await.status.success());
    assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), ca);
    assert_eq!(std::fs::read(dir.path().join("server.pem")).unwrap(), cert);
}

#[tokio::test]
async fn token_mints_what_an_authenticating_node_accepts() {
    const SECRET: &str = "cli-test-secret-0123456789abcdef-0123";
    let node = TestNode::start_with(|c| c.auth_jwt_secret = Some(SECRET.into())).await;
    let mut mint = fabric(&node);
    mint.args(["token", "--sub", "zed", "--ttl", "10m"])
        .env("FABRIC_AUTH_JWT_SECRET", SECRET);
    let out = output(mint).await;
    assert_success(&out);
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(token.matches('.').count(), 2, "a JWT: {token}");

    let mut list = fabric(&node);
    list.args(["--name", "z", "list"])
        .env("FABRIC_TOKEN", &token);
    let out = output(list).await;
    assert_success(&out);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["clients"][0]["user"], "zed");

    // Without a token: a non-zero exit that says why.
    let mut anon = fabric(&node);
    anon.arg("list");
    let out = output(anon).await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("requires a token"), "{err}");

    // A weak secret is refused at minting time.
    let mut weak = fabric(&node);
    weak.args(["token", "--secret", "short", "--sub", "x"]);
    let out = output(weak).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 32 bytes"));
}

/// The close line of a connection the node dropped as a slow consumer
/// states the close code the client received (5), not "closed locally".
#[tokio::test]
async fn a_slow_consumer_disconnect_is_logged_with_the_close_code_sent() {
    let certs = common::TestCerts::new();
    let node = json_logging_node(
        certs.dir.path(),
        &["--max-message-bytes", "4096", "--max-queued-bytes", "65536"],
    )
    .await;
    let sender = node.connect("sender").await;
    // A client that stops reading, with tiny QUIC windows.
    let ca = certs.dir.path().join("ca.pem");
    let sink = common::RawClient::try_connect_to(node.addr.parse().unwrap(), &ca, |t| {
        t.stream_receive_window(quinn::VarInt::from_u32(4096));
        t.receive_window(quinn::VarInt::from_u32(8192));
    })
    .await
    .unwrap();
    let (_keep, _recv, ack) = sink.handshake("sink").await;
    let Body::HandshakeAck(ack) = ack.body else {
        panic!("no ack: {ack:?}")
    };
    while sink.conn.close_reason().is_none() {
        let _ = sender
            .direct(
                ack.client_id,
                Payload::Binary(vec![0; 4000]),
                Priority::Normal,
            )
            .await;
    }
    assert_eq!(sink.closed_code().await, Some(5));

    let out = node.terminate().await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let closed: Vec<serde_json::Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| {
            l["fields"]["message"] == "connection closed"
                && l["span"]["client_id"] == ack.client_id.to_string()
        })
        .collect();
    assert_eq!(closed.len(), 1, "one close line for the sink in:\n{stderr}");
    assert_eq!(closed[0]["fields"]["code"], 5, "{}", closed[0]);
    assert!(
        closed[0]["fields"]["reason"]
            .as_str()
            .unwrap()
            .contains("slow consumer"),
        "{}",
        closed[0]
    );
}

/// `gen-certs` run from several scripts at once, some with other names (a
/// renewal racing a first start): all succeed, and what stays on disk is one
/// consistent set, the key belonging to the certificate and the certificate
/// signed by the CA that clients trust.
#[tokio::test]
async fn gen_certs_run_together_leave_one_consistent_set() {
    use quic_fabric::tls;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{ServerName, UnixTime};

    let dir = tempfile::tempdir().unwrap();
    let runs = (0..16).map(|i| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fabric-node"));
        cmd.arg("gen-certs")
            .arg("--certs")
            .arg(dir.path())
            .arg("--cert-names")
            .arg(["localhost,127.0.0.1", "localhost,lb"][i % 2])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        output(cmd)
    });
    for out in futures_util::future::join_all(runs).await {
        assert_success(&out);
    }
    let paths = tls::DevCertPaths::in_dir(dir.path());
    let chain = tls::load_certs(&paths.server_cert).unwrap();
    let key = tls::load_key(&paths.server_key).unwrap();
    tls::server_crypto(chain.clone(), key, None, None).expect("server.key belongs to server.pem");
    let mut roots = rustls::RootCertStore::empty();
    for ca in tls::load_certs(&paths.ca_cert).unwrap() {
        roots.add(ca).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
            .build()
            .unwrap();
    let names = std::fs::read_to_string(&paths.server_names).unwrap();
    for name in names.lines() {
        let name = ServerName::try_from(name.to_owned()).unwrap();
        verifier
            .verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
            .unwrap_or_else(|e| panic!("server.pem for {name:?} against ca.pem: {e}"));
    }
}

#[tokio::test]
async fn sub_prints_connected_subscribed_then_publications_and_exits_after_count() {
    let node = TestNode::start().await;
    let mut cmd = fabric(&node);
    cmd.args(["--name", "watcher", "sub", "news", "sport", "--events"])
        .args(["--count", "2"])
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut out = Stdout::of(&mut child);
    let connected = out.json().await;
    assert_eq!(connected["type"], "connected", "{connected}");
    assert_eq!(connected["node_id"], node.id().to_string());
    let watcher = connected["client_id"].as_str().unwrap().to_owned();
    for channel in ["news", "sport"] {
        let subscribed = out.json().await;
        assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
        assert_eq!(subscribed["channel"], channel);
        assert_eq!(subscribed["subscribers"], 1, "{subscribed}");
    }

    // Members joining and leaving are shown (--events) and not counted.
    let alice = node.connect("alice").await;
    assert_eq!(alice.subscribe("news", false).await.unwrap(), Some(2));
    let join = out.json().await;
    assert_eq!(join["type"], "join", "{join}");
    assert_eq!(join["channel"], "news");
    assert_eq!(join["member"]["client_id"], alice.client_id().to_string());
    assert_eq!(join["member"]["name"], "alice");
    assert_eq!(join["member"]["node_id"], node.id().to_string());
    assert_eq!(join["member"]["user"], Value::Null);

    let id = alice
        .publish("news", Payload::Text("first".into()), Priority::High)
        .await
        .unwrap();
    let first = out.json().await;
    assert_eq!(first["type"], "publication", "{first}");
    assert_eq!(first["channel"], "news");
    assert_eq!(first["text"], "first");
    assert_eq!(first["id"], id.to_string());
    assert_eq!(first["priority"], "high");
    assert_eq!(first["from"]["client_id"], alice.client_id().to_string());
    assert_eq!(first["from"]["name"], "alice");
    assert_eq!(first["from"]["node_id"], node.id().to_string());
    assert_ne!(first["from"]["client_id"], watcher.as_str());

    alice.unsubscribe("news").await.unwrap();
    let leave = out.json().await;
    assert_eq!(leave["type"], "leave", "{leave}");
    assert_eq!(leave["member"]["name"], "alice");

    // The server's publication: no sender; a binary payload in base64.
    let (id, _) = node
        .server_publish("sport", Priority::Normal, Payload::Binary(vec![1, 2, 3]))
        .await
        .unwrap();
    let second = out.json().await;
    assert_eq!(second["type"], "publication", "{second}");
    assert_eq!(second["channel"], "sport");
    assert_eq!(second["binary"], "AQID");
    assert_eq!(second["id"], id.to_string());
    assert_eq!(second["from"], Value::Null);
    assert!(exits(&mut child).await.success(), "--count 2 exits 0");
}

#[tokio::test]
async fn sub_reconnects_and_subscribes_again_by_default() {
    let node = TestNode::start().await;
    let mut cmd = fabric(&node);
    cmd.args(["sub", "news", "--count", "1"])
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut out = Stdout::of(&mut child);
    let first: ClientId = out.json().await["client_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(out.json().await["type"], "subscribed");
    node.kick(first, "go away for a moment").await.unwrap();
    // The kick's Goodbye may come first, if it beats the close.
    let mut disconnected = out.json().await;
    if disconnected["type"] == "goodbye" {
        assert_eq!(disconnected["reason"], "go away for a moment");
        disconnected = out.json().await;
    }
    assert_eq!(disconnected["type"], "disconnected", "{disconnected}");
    let reconnected = out.json().await;
    assert_eq!(reconnected["type"], "reconnected", "{reconnected}");
    assert_ne!(reconnected["client_id"], first.to_string());
    let resubscribed = out.json().await;
    assert_eq!(resubscribed["type"], "resubscribed", "{resubscribed}");
    assert_eq!(resubscribed["channels"], serde_json::json!(["news"]));
    assert_eq!(resubscribed["failed"], serde_json::json!([]));

    let alice = node.connect("alice").await;
    alice
        .publish(
            "news",
            Payload::Text("still there?".into()),
            Priority::Normal,
        )
        .await
        .unwrap();
    let got = out.json().await;
    assert_eq!(got["type"], "publication", "{got}");
    assert_eq!(got["text"], "still there?");
    assert!(exits(&mut child).await.success());
}

#[tokio::test]
async fn sub_refused_exits_one_with_the_nodes_reason() {
    let node = TestNode::start_with(|c| {
        c.namespaces = vec!["staff,subscribe=authenticated".parse().unwrap()];
    })
    .await;
    let mut cmd = fabric(&node);
    cmd.args(["sub", "news", "staff:room"]);
    let out = output(cmd).await;
    assert_fails_with(
        &out,
        &[
            "cannot subscribe to staff:room",
            "needs an authenticated user",
        ],
    );
    // The channels before it were subscribed and shown.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert_eq!(lines[1]["type"], "subscribed");
    assert_eq!(lines[1]["channel"], "news");
}

#[tokio::test]
async fn pub_exits_zero_on_ack_and_one_with_the_nodes_reason() {
    let node = TestNode::start_with(|c| {
        c.namespaces = vec!["announce,publish=nobody".parse().unwrap()];
    })
    .await;
    let mut bob = node.connect("bob").await;
    bob.subscribe("news", false).await.unwrap();
    let mut cmd = fabric(&node);
    cmd.args([
        "--name",
        "cli",
        "pub",
        "news",
        "extra!",
        "--priority",
        "high",
    ]);
    let out = output(cmd).await;
    assert_success(&out);
    let ack: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ack["type"], "ack");
    let got = next_matching(&mut bob, |f| matches!(f.body, Body::Publish { .. })).await;
    assert_eq!(ack["of"], got.id.to_string());
    assert_eq!(
        got.body,
        Body::Publish {
            channel: "news".into(),
            payload: Payload::Text("extra!".into())
        }
    );
    assert_eq!(got.priority, Priority::High);
    assert_eq!(got.sender.unwrap().name, "cli");

    let mut cmd = fabric(&node);
    cmd.args(["pub", "nope:x", "lost"]);
    let out = output(cmd).await;
    assert_fails_with(&out, &["namespace \"nope\" is not declared"]);
    assert!(out.stdout.is_empty());

    let mut cmd = fabric(&node);
    cmd.args(["pub", "announce:all", "not mine to say"]);
    assert_fails_with(&output(cmd).await, &["error 17"]);
}

#[tokio::test]
async fn presence_lists_the_members_with_their_fields() {
    let node = TestNode::start_with(|c| {
        c.auth_jwt_secret = Some(JWT_SECRET.into());
        c.namespaces = vec!["quiet,presence=off".parse().unwrap()];
    })
    .await;
    let alice = connect_as(&node, "alice-phone", "alice").await;
    alice.subscribe("lobby", false).await.unwrap();
    let bob = connect_as(&node, "bob-laptop", "bob").await;
    bob.subscribe("lobby", false).await.unwrap();

    let mut cmd = fabric(&node);
    cmd.args(["presence", "lobby"])
        .env("FABRIC_TOKEN", token("carol"));
    let out = output(cmd).await;
    assert_success(&out);
    let presence: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(presence["channel"], "lobby");
    assert_eq!(presence["truncated"], false);
    let members = presence["members"].as_array().unwrap();
    assert_eq!(members.len(), 2, "{presence}");
    // Oldest connection first.
    for (member, (client, name, user)) in members.iter().zip([
        (&alice, "alice-phone", "alice"),
        (&bob, "bob-laptop", "bob"),
    ]) {
        assert_eq!(member["client_id"], client.client_id().to_string());
        assert_eq!(member["name"], name);
        assert_eq!(member["user"], user);
        assert_eq!(member["node_id"], node.id().to_string());
        assert!(member["connected_at_ms"].as_u64().unwrap() > 0, "{member}");
    }
    assert!(members[0]["connected_at_ms"].as_u64() <= members[1]["connected_at_ms"].as_u64());

    let mut cmd = fabric(&node);
    cmd.args(["presence", "quiet:room"])
        .env("FABRIC_TOKEN", token("carol"));
    assert_fails_with(&output(cmd).await, &["presence is off"]);
}

#[tokio::test]
async fn send_to_a_user_reaches_each_of_its_connections() {
    let node = TestNode::start_with(|c| c.auth_jwt_secret = Some(JWT_SECRET.into())).await;
    let mut phone = connect_as(&node, "zed-phone", "zed").await;
    let mut laptop = connect_as(&node, "zed-laptop", "zed").await;
    let mut cmd = fabric(&node);
    cmd.args(["--name", "amy-cli", "send", "--user", "zed", "hi zed"])
        .env("FABRIC_TOKEN", token("amy"));
    let out = output(cmd).await;
    assert_success(&out);
    let ack: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ack["type"], "ack");
    for zed in [&mut phone, &mut laptop] {
        let got = next_matching(zed, |f| matches!(f.body, Body::UserDirect { .. })).await;
        assert_eq!(ack["of"], got.id.to_string());
        assert_eq!(
            got.body,
            Body::UserDirect {
                user: "zed".into(),
                payload: Payload::Text("hi zed".into())
            }
        );
        let sender = got.sender.unwrap();
        assert_eq!(
            (sender.name.as_str(), sender.user.as_deref()),
            ("amy-cli", Some("amy"))
        );
    }

    let mut cmd = fabric(&node);
    cmd.args(["send", "--user", "nobody", "anyone?"])
        .env("FABRIC_TOKEN", token("amy"));
    assert_fails_with(&output(cmd).await, &["user nobody has no connection"]);

    // Exactly one of --to and --user: a usage error otherwise.
    for args in [
        &["send", "text"][..],
        &[
            "send",
            "--user",
            "zed",
            "--to",
            &phone.client_id().to_string(),
            "x",
        ],
    ] {
        let mut cmd = fabric(&node);
        cmd.args(args);
        let out = output(cmd).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}

#[tokio::test]
async fn chat_joins_rooms_talks_there_and_resolves_to_targets() {
    let node = TestNode::start().await;
    let mut bob = node.connect("bob").await;
    bob.subscribe("lobby", true).await.unwrap();
    let _twins = [node.connect("twin").await, node.connect("twin").await];
    let mut cmd = fabric(&node);
    cmd.args(["--name", "typist", "chat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = Stdout::of(&mut child);
    let banner = out.line().await;
    assert!(banner.contains("/join ROOM"), "{banner}");

    stdin.write_all(b"/join lobby\n").await.unwrap();
    out.find("* joined lobby (2 here); lines now go to lobby")
        .await;
    let join = next_matching(&mut bob, |f| matches!(f.body, Body::Join { .. })).await;
    let Body::Join { channel, member } = join.body else {
        unreachable!()
    };
    assert_eq!(
        (channel.as_str(), member.name.as_str()),
        ("lobby", "typist")
    );

    // Typed lines go to the current room; the room's lines show its name.
    stdin.write_all(b"hello room\n").await.unwrap();
    let got = next_matching(&mut bob, |f| matches!(f.body, Body::Publish { .. })).await;
    assert_eq!(
        got.body,
        Body::Publish {
            channel: "lobby".into(),
            payload: Payload::Text("hello room".into())
        }
    );
    assert_eq!(got.sender.unwrap().name, "typist");
    bob.publish("lobby", Payload::Text("hi typist".into()), Priority::Normal)
        .await
        .unwrap();
    out.find("[lobby] bob: hi typist").await;

    stdin.write_all(b"/who\n").await.unwrap();
    out.find("* 2 in lobby:").await;
    let first = out.line().await;
    let second = out.line().await;
    assert!(
        first.contains(&bob.client_id().to_string()) && first.contains(" bob "),
        "{first}"
    );
    assert!(
        second.contains(" typist ") && second.ends_with("(you)"),
        "{second}"
    );

    // /to: a name, an ambiguous name, nobody.
    stdin.write_all(b"/to bob psst\n").await.unwrap();
    let got = next_matching(&mut bob, |f| matches!(f.body, Body::Direct { .. })).await;
    assert_eq!(
        got.body,
        Body::Direct {
            to: bob.client_id(),
            payload: Payload::Text("psst".into())
        }
    );
    stdin.write_all(b"/to twin hey\n").await.unwrap();
    let ambiguous = out.find("clients are named twin").await;
    assert!(
        ambiguous.starts_with("! 2 clients") && ambiguous.contains("use /to ID TEXT"),
        "{ambiguous}"
    );
    stdin.write_all(b"/to nobody hey\n").await.unwrap();
    out.find("! nobody called nobody").await;

    // Leaving the room: bob sees it, and lines are broadcast again.
    stdin.write_all(b"/leave lobby\n").await.unwrap();
    out.find("* left lobby").await;
    assert_eq!(out.line().await, "* lines are now broadcast to everyone");
    let leave = next_matching(&mut bob, |f| matches!(f.body, Body::Leave { .. })).await;
    assert!(matches!(leave.body, Body::Leave { member, .. } if member.name == "typist"));
    stdin.write_all(b"to everyone\n/quit\n").await.unwrap();
    let got = next_matching(&mut bob, |f| matches!(f.body, Body::Broadcast { .. })).await;
    assert_eq!(
        got.body,
        Body::Broadcast {
            payload: Payload::Text("to everyone".into())
        }
    );
    assert!(exits(&mut child).await.success());
}

/// `fabric sub` shows positions in a channel with history and recovers
/// from `--since EPOCH:OFFSET`; `fabric history` prints the latest
/// publications as `publication` lines, then the channel's position.
#[tokio::test]
async fn sub_since_recovers_and_history_prints_the_latest_publications() {
    let node = TestNode::start_with(|c| {
        c.namespaces = vec!["h,history_size=100,history_ttl=10m".parse().unwrap()];
    })
    .await;
    let alice = node.connect("alice").await;
    for i in 1..=5 {
        alice
            .publish("h:log", Payload::Text(format!("m{i}")), Priority::Normal)
            .await
            .unwrap();
    }
    let out = output({
        let mut cmd = fabric(&node);
        cmd.args(["history", "h:log", "--limit", "3"]);
        cmd
    })
    .await;
    assert_success(&out);
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "{lines:?}");
    let epoch = lines[3]["epoch"].as_str().unwrap().to_owned();
    assert_eq!(lines[3]["type"], "history");
    assert_eq!(lines[3]["offset"], 5);
    assert_eq!(lines[3]["count"], 3);
    assert_eq!(lines[3]["more"], true);
    for (line, i) in lines[..3].iter().zip(3..) {
        assert_eq!(line["type"], "publication", "{line}");
        assert_eq!(line["text"], format!("m{i}"));
        assert_eq!(line["offset"], i);
        assert_eq!(line["epoch"], epoch.as_str());
        assert_eq!(line["from"]["name"], "alice");
    }

    let mut cmd = fabric(&node);
    cmd.args([
        "sub",
        "h:log",
        "--since",
        &format!("{epoch}:3"),
        "--count",
        "3",
    ])
    .stdout(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut out = Stdout::of(&mut child);
    assert_eq!(out.json().await["type"], "connected");
    let subscribed = out.json().await;
    assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
    assert_eq!(subscribed["channel"], "h:log");
    assert_eq!(subscribed["recovered"], true);
    assert_eq!(subscribed["recovery"], "recovered");
    assert_eq!(subscribed["epoch"], epoch.as_str());
    assert_eq!(subscribed["offset"], 5);
    for i in 4..=5 {
        let line = out.json().await;
        assert_eq!(line["type"], "publication", "{line}");
        assert_eq!(line["text"], format!("m{i}"));
        assert_eq!(line["offset"], i);
    }
    alice
        .publish("h:log", Payload::Text("m6".into()), Priority::Normal)
        .await
        .unwrap();
    let live = out.json().await;
    assert_eq!(
        (live["text"].as_str(), live["offset"].as_u64()),
        (Some("m6"), Some(6))
    );
    assert!(exits(&mut child).await.success(), "--count 3 exits 0");

    let out = output({
        let mut cmd = fabric(&node);
        cmd.args(["sub", "h:log", "room", "--since", &format!("{epoch}:3")]);
        cmd
    })
    .await;
    assert_fails_with(&out, &["--since needs exactly one channel"]);
    let out = output({
        let mut cmd = fabric(&node);
        cmd.args(["sub", "h:log", "--since", "3"]);
        cmd
    })
    .await;
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected EPOCH:OFFSET"));
}
