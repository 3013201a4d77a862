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

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{TestCerts, TestNode, UdpProxy, WAIT};
use quic_fabric::bus::memory::MemoryCluster;
use quic_fabric::client::{Client, Event};
use quic_fabric::node::BusChoice;
use quic_fabric::protocol::{Body, ClientId, Frame, Payload, Priority};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// `name` on the PATH, if it is there.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

/// Headless Chromium behind `drive.mjs`.
struct Browser {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    /// The process group of the driver and Chromium.
    group: u32,
}

impl Browser {
    /// Starts the driver, or None when the browser is missing and the test
    /// may be skipped.
    fn start() -> Option<Browser> {
        let chromium = on_path("chromium");
        let node = on_path("node");
        let (Some(chromium), Some(node)) = (chromium, node) else {
            if std::env::var("FABRIC_SKIP_BROWSER").as_deref() == Ok("1") {
                eprintln!("skipped: chromium or node missing and FABRIC_SKIP_BROWSER=1");
                return None;
            }
            panic!(
                "the browser test needs `chromium` and `node` on the PATH \
                 (Debian: apt-get install chromium; .ci/run installs it); \
                 set FABRIC_SKIP_BROWSER=1 to skip it"
            );
        };
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/drive.mjs");
        let mut child = tokio::process::Command::new(node)
            .arg(script)
            .arg(chromium)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .expect("node starts");
        let group = child.id().expect("driver pid");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        Some(Browser {
            child,
            stdin,
            stdout,
            group,
        })
    }

    /// Runs one driver command; panics with the page's console on failure.
    async fn call(&mut self, cmd: Value) -> Value {
        let line = format!("{cmd}\n");
        self.stdin.write_all(line.as_bytes()).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(60), self.stdout.next_line())
            .await
            .unwrap_or_else(|_| panic!("driver answers {cmd} in time"))
            .unwrap()
            .unwrap_or_else(|| panic!("driver ended during {cmd}"));
        let answer: Value = serde_json::from_str(&answer).unwrap();
        if answer["ok"] != json!(true) {
            panic!(
                "browser command {cmd} failed: {}\nconsole: {:#}",
                answer["error"], answer["console"]
            );
        }
        answer["value"].clone()
    }

    async fn eval(&mut self, expr: &str) -> Value {
        self.call(json!({"do": "eval", "expr": expr})).await
    }

    async fn wait_for(&mut self, expr: &str) {
        self.wait_for_within(expr, WAIT).await;
    }

    async fn wait_for_within(&mut self, expr: &str, within: Duration) {
        self.call(json!({"do": "waitFor", "expr": expr, "timeoutMs": within.as_millis() as u64}))
            .await;
    }

    /// Types `text` into the message box and presses Send, as a user would.
    async fn say(&mut self, text: &str) {
        let expr = format!(
            "(() => {{ const m = document.getElementById('message'); m.value = {text}; \
             document.getElementById('send').click(); return true; }})()",
            text = json!(text)
        );
        self.eval(&expr).await;
    }

    /// Waits until the page's log shows an entry of `kind` with `text`.
    async fn wait_for_entry(&mut self, kind: &str, text: &str) {
        let expr = format!(
            "fabricDemo.log.some(e => e.kind === {} && e.text === {})",
            json!(kind),
            json!(text)
        );
        self.wait_for(&expr).await;
    }

    /// What the page shows (log, errors, state), for failure messages.
    async fn dump(&mut self) -> String {
        let page = self
            .eval("JSON.stringify({state: fabricDemo.state, log: fabricDemo.log, errors: fabricDemo.errors})")
            .await;
        let console = self.call(json!({"do": "console"})).await;
        format!(
            "page: {}\nconsole: {console:#}",
            page.as_str().unwrap_or_default()
        )
    }

    /// Closes Chromium and checks that no process of it is left.
    async fn close(mut self) {
        let left = self.call(json!({"do": "close"})).await;
        assert_eq!(left, json!([]), "browser processes left behind");
        let _ = tokio::time::timeout(WAIT, self.child.wait()).await;
        assert!(
            !group_alive(self.group),
            "a process of the browser's group is still running"
        );
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Whatever happened, leave no browser behind.
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.group)])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Whether any process belongs to process group `group`.
fn group_alive(group: u32) -> bool {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|entry| {
        std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|stat| {
                // pid (comm) state ppid pgrp ...: comm may hold spaces.
                let rest = &stat[stat.rfind(')')? + 2..];
                rest.split_whitespace().nth(2)?.parse::<u32>().ok()
            })
            .is_some_and(|pgrp| pgrp == group)
    })
}

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
    browser.call(json!({"do": "open", "url": url})).await;
    browser
        .wait_for_within("fabricDemo.state === 'connected'", Duration::from_secs(20))
        .await;
    let id: ClientId = browser
        .eval("fabricDemo.client.clientId")
        .await
        .as_str()
        .unwrap()
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
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&shots).unwrap();
    let shot = shots.join("demo-page.png");
    browser
        .call(json!({"do": "screenshot", "path": shot}))
        .await;
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    eprintln!("screenshot: {}", shot.display());

    // A drains; the load balancer now sends to B. The page gets the
    // Goodbye, reconnects by itself and resumes its session: same id.
    lb.retarget(b.addr);
    a.start_drain();
    browser
        .wait_for_within(
            &format!(
                "fabricDemo.state === 'connected' && fabricDemo.client.nodeId === '{}'",
                b.id()
            ),
            Duration::from_secs(30),
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
