//! The `fabric` and `fabric-node` binaries, run as a user would.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{TestNode, WAIT, next_matching};
use quic_fabric::protocol::{Body, ClientId, Payload, Priority};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

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
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    assert!(out.status.success());
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
    assert!(out.status.success());
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
    let port = {
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let node = Command::new(env!("CARGO_BIN_EXE_fabric-node"))
        .args(["--listen", &addr, "--certs-dir"])
        .arg(certs.path())
        .args(["--name", "proc-node", "--shutdown-grace", "1s"])
        .args(["--log-format", "json"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let config = quic_fabric::client::ClientConfig::new(addr.clone(), certs.path().join("ca.pem"));
    let client = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(c) = quic_fabric::client::Client::connect(&config).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("node comes up");
    assert_eq!(client.handshake().server_name, "proc-node");
    for file in ["ca.pem", "server.pem", "server.key", "ca.key"] {
        assert!(certs.path().join(file).exists(), "{file} generated");
    }
    let pid = node.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = tokio::time::timeout(WAIT, node.wait_with_output())
        .await
        .expect("node exits after SIGTERM")
        .unwrap();
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
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(token.matches('.').count(), 2, "a JWT: {token}");

    let mut list = fabric(&node);
    list.args(["--name", "z", "list"])
        .env("FABRIC_TOKEN", &token);
    let out = output(list).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    let addr = format!("127.0.0.1:{}", common::free_udp_port());
    let node = Command::new(env!("CARGO_BIN_EXE_fabric-node"))
        .args(["--listen", &addr, "--certs-dir"])
        .arg(certs.dir.path())
        .args(["--max-message-bytes", "4096", "--max-queued-bytes", "65536"])
        .args(["--shutdown-grace", "1s", "--log-format", "json"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let ca = certs.dir.path().join("ca.pem");
    let config = quic_fabric::client::ClientConfig::new(addr.clone(), ca.clone()).name("sender");
    let sender = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(c) = quic_fabric::client::Client::connect(&config).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("node comes up");
    // A client that stops reading, with tiny QUIC windows.
    let sink = common::RawClient::try_connect_to(addr.parse().unwrap(), &ca, |t| {
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

    let pid = node.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = tokio::time::timeout(WAIT, node.wait_with_output())
        .await
        .expect("node exits after SIGTERM")
        .unwrap();
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
        assert!(
            out.status.success(),
            "stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let paths = tls::DevCertPaths::in_dir(dir.path());
    let chain = tls::load_certs(&paths.server_cert).unwrap();
    let key = tls::load_key(&paths.server_key).unwrap();
    tls::server_crypto(chain.clone(), key, None).expect("server.key belongs to server.pem");
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
