//! A node killed without cleanup (SIGKILL) and started again on the same
//! address: the clients of the old process learn at once that their
//! connection is gone (a QUIC stateless reset the new process can make,
//! because its reset key comes from the node's TLS key), instead of waiting
//! for their idle timeout.

mod common;

use std::time::Duration;

use common::{NodeProcess, TestCerts};
use quic_fabric::client::{Client, Event};

/// Far below the connection's idle timeout (30 s here), far above a round
/// trip on a busy machine.
const PROMPTLY: Duration = Duration::from_secs(3);

#[tokio::test]
async fn a_restarted_node_resets_the_connections_of_its_previous_process() {
    let certs = TestCerts::new();
    // The names TestCerts made the certificate for: no renewal.
    let mut node =
        NodeProcess::start(certs.dir.path(), &["--cert-names", "localhost,127.0.0.1"]).await;
    let mut config = node.client_config("old");
    // Longer than the node's (30 s), so the negotiated idle timeout is the
    // node's: without a reset, the client would wait that long.
    config.idle_timeout = Duration::from_secs(60);
    let mut client = Client::connect(&config).await.unwrap();
    client.ping().await.unwrap();

    node.kill().await; // SIGKILL: no close, no Goodbye
    node.restart().await;

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
