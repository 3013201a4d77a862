//! Headless Chromium for tests: `tests/browser/drive.mjs` (Node.js, CDP
//! over a pipe, no npm) spawned in its own process group, driven with one
//! JSON command per line. Without `chromium` (or `node`) on the PATH,
//! [`Browser::start`] fails the test saying how to install it, unless
//! `FABRIC_SKIP_BROWSER=1`, when it returns None. Self-contained, so that
//! tests without the rest of `common` (the compose e2e) can include it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// How long the page gets for anything that should happen soon.
const WAIT: Duration = Duration::from_secs(10);

/// `name` on the PATH, if it is there.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

/// Headless Chromium behind `drive.mjs`.
pub struct Browser {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    /// The process group of the driver and Chromium.
    group: u32,
}

impl Browser {
    /// Starts the driver, or None when the browser is missing and the test
    /// may be skipped.
    pub fn start() -> Option<Browser> {
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
    pub async fn call(&mut self, cmd: Value) -> Value {
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

    pub async fn eval(&mut self, expr: &str) -> Value {
        self.call(json!({"do": "eval", "expr": expr})).await
    }

    pub async fn wait_for(&mut self, expr: &str) {
        self.wait_for_within(expr, WAIT).await;
    }

    pub async fn wait_for_within(&mut self, expr: &str, within: Duration) {
        self.call(json!({"do": "waitFor", "expr": expr, "timeoutMs": within.as_millis() as u64}))
            .await;
    }

    /// Opens the demo page at `url` (which autoconnects) and waits up to
    /// `within` for it to be connected; returns its client id.
    pub async fn open_connected(&mut self, url: &str, within: Duration) -> String {
        self.call(json!({"do": "open", "url": url})).await;
        self.wait_for_within("fabricDemo.state === 'connected'", within)
            .await;
        let id = self.eval("fabricDemo.client.clientId").await;
        id.as_str().expect("a client id").to_owned()
    }

    /// Types `text` into the message box and presses Send, as a user would.
    pub async fn say(&mut self, text: &str) {
        let expr = format!(
            "(() => {{ const m = document.getElementById('message'); m.value = {text}; \
             document.getElementById('send').click(); return true; }})()",
            text = json!(text)
        );
        self.eval(&expr).await;
    }

    /// Waits until the page's log shows an entry of `kind` with `text`.
    pub async fn wait_for_entry(&mut self, kind: &str, text: &str) {
        let expr = format!(
            "fabricDemo.log.some(e => e.kind === {} && e.text === {})",
            json!(kind),
            json!(text)
        );
        self.wait_for(&expr).await;
    }

    /// What the page shows (log, errors, state), for failure messages.
    pub async fn dump(&mut self) -> String {
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
    pub async fn close(mut self) {
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

/// Where tests write screenshots: `target/tmp/browser/`.
pub fn screenshot_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
