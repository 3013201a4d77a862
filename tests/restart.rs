//! A node killed without cleanup (SIGKILL) and started again on the same
//! address: the clients of the old process learn at once that their
//! connection is gone (a QUIC stateless reset the new process can make,
//! because its reset key comes from the node's TLS key), instead of waiting
//! for their idle timeout.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{TestCerts, WAIT};
use quic_fabric::client::{Client, ClientConfig, Event, probe};
use tokio::process::{Child, Command};

/// Far below the connection's idle timeout (30 s here), far above a round
/// trip on a busy machine.
const PROMPTLY: Duration = Duration::from_secs(3);

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `fabric-node` on `addr` with the dev certificates in `certs` and
/// waits until it completes QUIC handshakes; starts it again if it exits
/// (for example because the port was not free yet).
async fn start_node(addr: &str, certs: &TestCerts) -> Child {
    let mut probe_config = ClientConfig::new(addr, certs.dir.path().join("ca.pem"));
    probe_config.connect_timeout = Duration::from_millis(500);
    tokio::time::timeout(WAIT, async {
        loop {
            let mut node = Command::new(env!("CARGO_BIN_EXE_fabric-node"))
                .args(["--listen", addr, "--certs-dir"])
                .arg(certs.dir.path())
                // The names TestCerts made the certificate for: no renewal.
                .args(["--cert-names", "localhost,127.0.0.1"])
                .env_remove("RUST_LOG")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            while node.try_wait().unwrap().is_none() {
                if probe(&probe_config).await.is_ok() {
                    return node;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    })
    .await
    .expect("node comes up")
}

#[tokio::test]
async fn a_restarted_node_resets_the_connections_of_its_previous_process() {
    let certs = TestCerts::new();
    let addr = format!("127.0.0.1:{}", free_udp_port());
    let mut node = start_node(&addr, &certs).await;
    let mut config = ClientConfig::new(addr.clone(), certs.dir.path().join("ca.pem")).name("old");
    // Longer than the node's (30 s), so the negotiated idle timeout is the
    // node's: without a reset, the client would wait that long.
    config.idle_timeout = Duration::from_secs(60);
    let mut client = Client::connect(&config).await.unwrap();
    client.ping().await.unwrap();

    node.start_kill().unwrap(); // SIGKILL: no close, no Goodbye
    node.wait().await.unwrap();
    let _node = start_node(&addr, &certs).await;

    // The ping reaches the new process, which does not know the connection.
    let ping = tokio::time::timeout(PROMPTLY, client.ping())
        .await
        .expect("the ping fails promptly instead of waiting for the idle timeout");
    assert!(ping.is_err(), "the old connection answered: {ping:?}");
    match tokio::time::timeout(PROMPTLY, client.next_event()).await {
        Ok(Some(Event::Closed { reason, .. })) => {
            assert!(
                reason.contains("reset"),
                "closed, but not by a reset: {reason}"
            )
        }
        other => panic!("expected the connection closed by a reset, got {other:?}"),
    }
}
