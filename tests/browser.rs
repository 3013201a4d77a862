//! The demo page in real headless Chromium (Debian's `chromium`), against
//! real nodes: the page connects over WebTransport, chats with a native
//! Rust client both ways (broadcast, direct, a channel), shows errors, and
//! reconnects by itself when its node drains. A screenshot of the page is
//! written to `target/tmp/browser/`.
//!
//! Chromium is driven by `tests/browser/drive.mjs` (Node.js, CDP over a
//! pipe, no npm), spawned in its own process group; the test checks that
//! no browser process is left. Without `chromium` on the PATH the test
//! fails, saying how to install it, unless `FABRIC_SKIP_BROWSER=1`.

mod common;

use std::time::Duration;

use common::browser::Browser;
use common::{TestCerts, TestNode, UdpProxy, WAIT};
use quic_fabric::bus::memory::MemoryCluster;
use quic_fabric::client::{Client, Event};
use quic_fabric::node::BusChoice;
use quic_fabric::protocol::{Body, ClientId, Frame, Payload, Priority};
use serde_json::json;

/// The next frame `native` receives with `text`; on timeout, fails with
/// what the page shows.
async fn native_gets(native: &mut Client, browser: &mut Browser, text: &str) -> Frame {
    let wait = next_frame_with(native, text);
    match tokio::time::timeout(WAIT, wait).await {
        Ok(frame) => frame,
        Err(_) => panic!(
            "the native client got no {text:?}\n{}",
            browser.dump().await
        ),
    }
}

async fn next_frame_with(native: &mut Client, text: &str) -> Frame {
    loop {
        match native.next_event().await {
            Some(Event::Frame(f)) if text_of(&f) == Some(text) => return *f,
            Some(_) => continue,
            None => panic!("the native client's events ended"),
        }
    }
}

fn text_of(frame: &Frame) -> Option<&str> {
    match &frame.body {
        Body::Broadcast {
            payload: Payload::Text(t),
        }
        | Body::Direct {
            payload: Payload::Text(t),
            ..
        }
        | Body::Publication {
            payload: Payload::Text(t),
            ..
        }
        | Body::Publish {
            payload: Payload::Text(t),
            ..
        } => Some(t),
        _ => None,
    }
}

/// The channel of a publication (Publication, or Publish for version 2).
fn channel_of(frame: &Frame) -> Option<&str> {
    match &frame.body {
        Body::Publication { channel, .. } | Body::Publish { channel, .. } => Some(channel),
        _ => None,
    }
}

fn text(t: &str) -> Payload {
    Payload::Text(t.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_chats_with_a_native_client_and_survives_a_drain() {
    let Some(mut browser) = Browser::start() else {
        return;
    };
    // Two nodes of one cluster sharing a certs directory (so one
    // WebTransport certificate), behind a UDP "load balancer" that first
    // sends browsers to A. B serves the page.
    let certs = TestCerts::new();
    let bus = MemoryCluster::new();
    let a = TestNode::start_on(BusChoice::Memory(bus.clone()), Some(&certs), |c| {
        c.name = "node-a".into();
        c.shutdown_grace = Duration::from_secs(1);
        // While draining, A refuses the reconnects the load balancer still
        // sends it at once (as behind a real one), instead of vanishing
        // and leaving them to time out.
        c.drain_linger = Duration::from_secs(10);
    })
    .await;
    let lb = UdpProxy::start(a.addr).await;
    let b = TestNode::start_on(BusChoice::Memory(bus.clone()), Some(&certs), |c| {
        c.name = "node-b".into();
        c.web_listen = Some("127.0.0.1:0".parse().unwrap());
        c.webtransport_url = Some(format!("https://127.0.0.1:{}/fabric", lb.addr.port()));
    })
    .await;
    let mut native = b.connect("terminal").await;
    let web = b.web_addr.unwrap();

    // The page connects by itself, through the load balancer, to A.
    let url = format!(
        "http://127.0.0.1:{}/?name=browser&autoconnect=1",
        web.port()
    );
    let id: ClientId = browser
        .open_connected(&url, Duration::from_secs(20))
        .await
        .parse()
        .unwrap();
    let on = browser.eval("fabricDemo.client.nodeId").await;
    assert_eq!(on, json!(a.id().to_string()));

    // Browser → terminal: a line typed in the page is a broadcast.
    browser.say("hello from chromium").await;
    let got = native_gets(&mut native, &mut browser, "hello from chromium").await;
    assert!(matches!(got.body, Body::Broadcast { .. }));
    assert_eq!(got.sender.unwrap().client_id, id);

    // Terminal → browser: a broadcast and a direct message.
    native
        .broadcast(text("hello from the terminal"), Priority::Normal)
        .await
        .unwrap();
    browser
        .wait_for_entry("broadcast", "hello from the terminal")
        .await;
    native
        .direct(id, text("psst, browser"), Priority::High)
        .await
        .unwrap();
    browser.wait_for_entry("direct", "psst, browser").await;

    // Browser → terminal: a direct message by name, with the chat command.
    browser
        .eval("fabricDemo.run('/to terminal psst, terminal')")
        .await;
    let got = native_gets(&mut native, &mut browser, "psst, terminal").await;
    assert!(matches!(got.body, Body::Direct { .. }));
    assert_eq!(got.sender.unwrap().client_id, id);

    // A room (channel) both ways.
    native.subscribe("demo", true).await.unwrap();
    browser.eval("fabricDemo.run('/join demo')").await;
    browser
        .wait_for("fabricDemo.currentRoom === 'demo' && fabricDemo.rooms.includes('demo')")
        .await;
    native
        .publish("demo", text("news for the room"), Priority::Normal)
        .await
        .unwrap();
    browser
        .wait_for_entry("publication", "news for the room")
        .await;
    browser.say("a reply in the room").await;
    let got = native_gets(&mut native, &mut browser, "a reply in the room").await;
    assert_eq!(channel_of(&got), Some("demo"));

    // Errors are shown: a direct message to nobody.
    browser
        .eval("fabricDemo.run('/to 00000000-0000-4000-8000-000000000000 anyone?')")
        .await;
    browser
        .wait_for("fabricDemo.errors.some(e => e.codeName === 'UNKNOWN_CLIENT')")
        .await;
    browser
        .wait_for("document.getElementById('log').textContent.includes('UNKNOWN_CLIENT')")
        .await;
    // The round-trip time shows.
    browser
        .wait_for("/\\d/.test(document.getElementById('rtt').textContent)")
        .await;
    let shots = common::browser::screenshot_dir();
    let shot = shots.join("demo-page.png");
    browser
        .call(json!({"do": "screenshot", "path": shot}))
        .await;
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    eprintln!("screenshot: {}", shot.display());

    // A drains. The page gets the Goodbye, reconnects by itself (to B,
    // once the load balancer sends it there) and resumes its session:
    // same id.
    a.start_drain();
    // The page hears the Goodbye (its reconnects go to A, which refuses
    // them while it drains), then the load balancer sends it to B.
    browser
        .wait_for("fabricDemo.log.some(e => e.text.includes('server says goodbye'))")
        .await;
    lb.retarget(b.addr);
    browser
        .wait_for_within(
            &format!(
                "fabricDemo.state === 'connected' && fabricDemo.client.nodeId === '{}'",
                b.id()
            ),
            Duration::from_secs(60),
        )
        .await;
    let after = browser.eval("fabricDemo.client.clientId").await;
    assert_eq!(after, json!(id.to_string()), "the session was resumed");
    native
        .direct(id, text("still there?"), Priority::Normal)
        .await
        .unwrap();
    browser.wait_for_entry("direct", "still there?").await;
    browser.say("back in the room").await;
    let got = native_gets(&mut native, &mut browser, "back in the room").await;
    assert_eq!(channel_of(&got), Some("demo"));
    browser
        .call(json!({"do": "screenshot", "path": shots.join("demo-page-after-drain.png")}))
        .await;
    browser.close().await;
}

/// The round trip of a Ping answered by the node, from Chromium over
/// WebTransport and from a native client, on one node: a benchmark, not a
/// check (nothing is asserted about the figures). Run it with
/// `cargo test --release --test browser -- --ignored --nocapture`;
/// BENCHMARKS.md has the figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run by hand (BENCHMARKS.md, WebTransport from Chromium)"]
async fn round_trip_from_chromium_and_from_a_native_client() {
    const WARMUP: usize = 100;
    const PINGS: usize = 2_000;
    let Some(mut browser) = Browser::start() else {
        return;
    };
    let node = TestNode::start_with(|c| {
        c.web_listen = Some("127.0.0.1:0".parse().unwrap());
        // Back-to-back pings are a flood to the default rate limit.
        c.rate_limit_messages = 0;
    })
    .await;
    let web = node.web_addr.unwrap();
    let url = format!("http://127.0.0.1:{}/?name=bench&autoconnect=1", web.port());
    browser.open_connected(&url, Duration::from_secs(20)).await;
    let script = format!(
        "(async () => {{ const c = fabricDemo.client; const t = []; \
         for (let i = 0; i < {}; i++) {{ const ms = await c.ping(); if (i >= {WARMUP}) t.push(ms); }} \
         return t; }})()",
        WARMUP + PINGS
    );
    let page: Vec<f64> = browser
        .call(json!({"do": "eval", "expr": script, "timeoutMs": 120_000}))
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    browser.close().await;
    let native = node.connect("bench-native").await;
    let mut rust = Vec::with_capacity(PINGS);
    for i in 0..WARMUP + PINGS {
        let rtt = native.ping().await.unwrap();
        if i >= WARMUP {
            rust.push(rtt.as_secs_f64() * 1e3);
        }
    }
    let stats = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() - 1) as f64 * q) as usize];
        (
            at(0.5),
            at(0.9),
            at(0.99),
            v.iter().sum::<f64>() / v.len() as f64,
        )
    };
    let (n50, n90, n99, nmean) = stats(rust);
    let (b50, b90, b99, bmean) = stats(page);
    println!("ping round trip on one node, {PINGS} sequential pings after {WARMUP} warm-up (ms):");
    println!("| client | median | p90 | p99 | mean |");
    println!("|---|---|---|---|---|");
    println!("| native (Rust library, QUIC) | {n50:.3} | {n90:.3} | {n99:.3} | {nmean:.3} |");
    println!(
        "| Chromium (fabric.js, WebTransport) | {b50:.3} | {b90:.3} | {b99:.3} | {bmean:.3} |"
    );
    println!(
        "Chromium / native: median {:.2}x, p99 {:.2}x",
        b50 / n50,
        b99 / n99
    );
}
