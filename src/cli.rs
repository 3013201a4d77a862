//! The `fabric` command-line client: argument parsing and the subcommands,
//! on top of the client library. Errors print one line on stderr and exit
//! non-zero.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::client::{Client, ClientConfig, Congestion, Event, ReconnectPolicy, Socket};
use crate::protocol::json::{client_json, frame_json};
use crate::protocol::{Body, ClientId, Frame, Payload, Priority};
use crate::tls::{ClientCert, ServerTrust};

/// Command-line client for quic-fabric nodes.
#[derive(Debug, Parser)]
#[command(name = "fabric", version)]
pub struct Cli {
    /// Node (or load balancer) address, HOST:PORT.
    #[arg(
        long,
        global = true,
        env = "FABRIC_SERVER",
        default_value = "127.0.0.1:4433"
    )]
    pub server: String,
    /// CA certificate (PEM) the server certificate must chain to.
    #[arg(long, global = true, env = "FABRIC_CA", default_value = "certs/ca.pem")]
    pub ca: PathBuf,
    /// TLS server name to verify, if not the host part of --server.
    #[arg(long, global = true, env = "FABRIC_SERVER_NAME")]
    pub server_name: Option<String>,
    /// Name shown to other clients.
    #[arg(
        long,
        global = true,
        env = "FABRIC_CLIENT_NAME",
        default_value = "fabric-cli"
    )]
    pub name: String,
    /// Skip server certificate verification (development only).
    #[arg(long, global = true)]
    pub insecure: bool,
    /// Token (JWT) for nodes that require authentication.
    #[arg(long, global = true, env = "FABRIC_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Client certificate (PEM) for nodes that require mutual TLS.
    #[arg(long, global = true, env = "FABRIC_CLIENT_CERT", requires = "key")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) for --cert.
    #[arg(long, global = true, env = "FABRIC_CLIENT_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Congestion controller for what this client sends.
    #[arg(long, global = true, value_enum, default_value_t)]
    pub congestion_controller: Congestion,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `fabric` subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Interactive chat: lines are broadcast; /to ID TEXT, /list, /ping, /quit.
    Chat {
        /// Exit when the connection is lost instead of reconnecting.
        #[arg(long)]
        no_reconnect: bool,
    },
    /// Print every received frame as one JSON object per line.
    Listen {
        /// Exit after this many frames.
        #[arg(long)]
        count: Option<u64>,
        /// Exit when the connection is lost instead of reconnecting.
        #[arg(long)]
        no_reconnect: bool,
    },
    /// Broadcast TEXT to every other client.
    Broadcast {
        /// The text.
        text: String,
        /// Priority: low, normal or high.
        #[arg(long, default_value = "normal")]
        priority: Priority,
    },
    /// Send TEXT to one client; exits 0 only when the server acknowledged.
    Send {
        /// Recipient client id.
        #[arg(long)]
        to: ClientId,
        /// The text.
        text: String,
        /// Priority: low, normal or high.
        #[arg(long, default_value = "normal")]
        priority: Priority,
    },
    /// List connected clients as JSON.
    List,
    /// Measure application round trips.
    Ping {
        /// Number of pings.
        #[arg(long, default_value_t = 4)]
        count: u32,
        /// Pause between pings.
        #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
        interval: Duration,
    },
    /// Print the node's counters as JSON.
    Stats,
    /// Mint an HS256 token for local testing (does not connect).
    Token {
        /// The shared secret the node verifies with (at least 32 bytes; its UTF-8 bytes are the key, not base64-decoded).
        #[arg(long, env = "FABRIC_AUTH_JWT_SECRET", hide_env_values = true)]
        secret: String,
        /// The user id (`sub` claim).
        #[arg(long)]
        sub: String,
        /// Lifetime of the token.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Audience (`aud` claim).
        #[arg(long)]
        aud: Option<String>,
        /// Issuer (`iss` claim).
        #[arg(long)]
        iss: Option<String>,
        /// Channel patterns granted (`channels` claim; `*` = any run of
        /// characters), comma-separated.
        #[arg(long, value_delimiter = ',')]
        channels: Vec<String>,
    },
}

impl Cli {
    fn client_config(&self) -> ClientConfig {
        let mut config =
            ClientConfig::new(self.server.clone(), self.ca.clone()).name(self.name.clone());
        config.server_name = self.server_name.clone();
        // A short-lived process: its own socket, so closing waits until
        // the close has been sent.
        config.socket = Socket::Private;
        config.congestion = self.congestion_controller;
        if self.insecure {
            config.trust = ServerTrust::InsecureAcceptAny;
        }
        config.token = self.token.clone();
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            config.identity = Some(ClientCert {
                cert: cert.clone(),
                key: key.clone(),
            });
        }
        config
    }
}

/// Runs the CLI; returns the process exit code.
pub async fn run(cli: Cli) -> i32 {
    match execute(cli).await {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("fabric: {err:#}");
            1
        }
    }
}

async fn execute(cli: Cli) -> anyhow::Result<()> {
    if let Command::Token {
        secret,
        sub,
        ttl,
        aud,
        iss,
        channels,
    } = &cli.command
    {
        let token = crate::auth::mint_hs256(
            secret,
            sub,
            *ttl,
            aud.as_deref(),
            iss.as_deref(),
            channels,
        )?;
        println!("{token}");
        return Ok(());
    }
    if cli.insecure {
        eprintln!("fabric: warning: --insecure: the server certificate is NOT verified");
    }
    let mut config = cli.client_config();
    if let Command::Chat {
        no_reconnect: false,
    }
    | Command::Listen {
        no_reconnect: false,
        ..
    } = cli.command
    {
        config.reconnect = Some(ReconnectPolicy::default());
    }
    let mut client = Client::connect(&config).await?;
    let result = command(&mut client, cli.command).await;
    // Close explicitly, also after an error, so the node sees the client
    // leave at once instead of after the idle timeout.
    client.close("done").await;
    result
}

async fn command(client: &mut Client, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Chat { .. } => chat(client).await?,
        Command::Listen { count, .. } => listen(client, count).await?,
        Command::Broadcast { text, priority } => {
            let id = client.broadcast(Payload::Text(text), priority).await?;
            println!("{}", json!({"type": "ack", "of": id.to_string()}));
        }
        Command::Send { to, text, priority } => {
            let id = client.direct(to, Payload::Text(text), priority).await?;
            println!("{}", json!({"type": "ack", "of": id.to_string()}));
        }
        Command::List => {
            let (clients, truncated) = client.list().await?;
            let clients: Vec<Value> = clients.iter().map(client_json).collect();
            println!("{}", json!({"clients": clients, "truncated": truncated}));
        }
        Command::Ping { count, interval } => {
            let mut rtts = Vec::new();
            for i in 0..count {
                if i > 0 {
                    tokio::time::sleep(interval).await;
                }
                let rtt = client.ping().await?;
                println!(
                    "pong from node {}: seq={} time={:.3} ms",
                    client.node_id(),
                    i + 1,
                    ms(rtt)
                );
                rtts.push(rtt);
            }
            if let (Some(min), Some(max)) = (rtts.iter().min(), rtts.iter().max()) {
                let avg = rtts.iter().sum::<Duration>() / rtts.len() as u32;
                println!(
                    "{} pings: min {:.3} ms, avg {:.3} ms, max {:.3} ms",
                    rtts.len(),
                    ms(*min),
                    ms(avg),
                    ms(*max)
                );
            }
        }
        Command::Stats => {
            let stats = client.stats().await?;
            println!(
                "{}",
                json!({
                    "node_id": stats.node_id.to_string(),
                    "server_name": stats.server_name,
                    "uptime_ms": stats.uptime_ms,
                    "clients_connected": stats.clients_connected,
                    "connections_total": stats.connections_total,
                    "messages_in": stats.messages_in,
                    "messages_out": stats.messages_out,
                    "bytes_in": stats.bytes_in,
                    "bytes_out": stats.bytes_out,
                    "errors": stats.errors,
                    "slow_consumer_disconnects": stats.slow_consumer_disconnects,
                })
            );
        }
        Command::Token { .. } => unreachable!("handled before connecting"),
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn listen(client: &mut Client, count: Option<u64>) -> anyhow::Result<()> {
    println!(
        "{}",
        json!({"type": "connected", "client_id": client.client_id().to_string(), "node_id": client.node_id().to_string()})
    );
    let mut seen = 0u64;
    if count == Some(0) {
        return Ok(());
    }
    loop {
        tokio::select! {
            event = client.next_event() => match event {
                Some(Event::Frame(frame)) => {
                    println!("{}", frame_json(&frame));
                    seen += 1;
                    if Some(seen) == count {
                        return Ok(());
                    }
                }
                Some(Event::Disconnected { code, reason }) => {
                    println!("{}", json!({"type": "disconnected", "code": code, "reason": reason}));
                }
                Some(Event::Reconnected { client_id, node_id }) => {
                    println!(
                        "{}",
                        json!({"type": "reconnected", "client_id": client_id.to_string(), "node_id": node_id.to_string()})
                    );
                }
                Some(Event::Resubscribed { channels, failed }) => {
                    let failed: Vec<Value> = failed
                        .iter()
                        .map(|(channel, reason)| json!({"channel": channel, "reason": reason}))
                        .collect();
                    println!("{}", json!({"type": "resubscribed", "channels": channels, "failed": failed}));
                }
                Some(Event::Closed { code, reason }) => {
                    println!("{}", json!({"type": "closed", "code": code, "reason": reason}));
                    anyhow::bail!("connection closed: {reason}");
                }
                None => anyhow::bail!("connection closed"),
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

async fn chat(client: &mut Client) -> anyhow::Result<()> {
    println!(
        "connected as {} on node {} ({}). Type to broadcast; /to ID TEXT, /list, /ping, /quit.",
        client.client_id(),
        client.node_id(),
        client.handshake().server_name
    );
    let mut events = client.take_events();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line? else { break };
                if !chat_command(client, line.trim()).await? {
                    break;
                }
            }
            event = events.recv() => match event {
                Some(Event::Frame(frame)) => {
                    if let Some(text) = chat_line(&frame) {
                        println!("{text}");
                    }
                }
                Some(Event::Disconnected { reason, .. }) => println!("* connection lost ({reason}); reconnecting"),
                Some(Event::Reconnected { client_id, node_id }) => {
                    println!("* reconnected as {client_id} on node {node_id}")
                }
                Some(Event::Resubscribed { channels, failed }) => {
                    if !channels.is_empty() {
                        println!("* rejoined {}", channels.join(", "));
                    }
                    for (channel, reason) in failed {
                        println!("! could not rejoin {channel}: {reason}");
                    }
                }
                Some(Event::Closed { reason, .. }) => anyhow::bail!("disconnected: {reason}"),
                None => anyhow::bail!("disconnected"),
            },
        }
    }
    Ok(())
}

/// Runs one chat input line; returns false to quit.
async fn chat_command(client: &Client, line: &str) -> anyhow::Result<bool> {
    if line.is_empty() {
        return Ok(true);
    }
    let result: Result<(), crate::client::ClientError> = async {
        match line
            .split_once(' ')
            .map_or((line, ""), |(c, r)| (c, r.trim()))
        {
            ("/quit", _) => return Ok(()),
            ("/list", _) => {
                let (clients, truncated) = client.list().await?;
                for c in &clients {
                    let me = if c.client_id == client.client_id() {
                        " (you)"
                    } else {
                        ""
                    };
                    println!("  {} {} on node {}{me}", c.client_id, c.name, c.node_id);
                }
                if truncated {
                    println!("  (list truncated)");
                }
            }
            ("/ping", _) => println!("pong: {:.3} ms", ms(client.ping().await?)),
            ("/to", rest) => match rest.split_once(' ') {
                Some((id, text)) => match id.parse::<ClientId>() {
                    Ok(to) => {
                        client
                            .direct(to, Payload::Text(text.to_owned()), Priority::Normal)
                            .await?;
                    }
                    Err(_) => println!("! not a client id: {id}"),
                },
                None => println!("! usage: /to ID TEXT"),
            },
            (cmd, _) if cmd.starts_with('/') => println!("! unknown command {cmd}"),
            _ => {
                client
                    .broadcast(Payload::Text(line.to_owned()), Priority::Normal)
                    .await?;
            }
        }
        Ok(())
    }
    .await;
    if line == "/quit" {
        return Ok(false);
    }
    match result {
        Ok(()) => Ok(true),
        Err(err @ crate::client::ClientError::Server { .. }) => {
            println!("! {err}");
            Ok(true)
        }
        Err(err) => Err(err.into()),
    }
}

fn chat_line(frame: &Frame) -> Option<String> {
    let from = frame.sender.as_ref().map_or("server", |s| s.name.as_str());
    let text = |p: &Payload| match p {
        Payload::Text(t) => t.clone(),
        Payload::Binary(b) => format!("<{} bytes>", b.len()),
    };
    match &frame.body {
        Body::Broadcast { payload } => Some(format!("[{from}] {}", text(payload))),
        Body::Direct { payload, .. } => Some(format!("[{from} → you] {}", text(payload))),
        Body::Goodbye { reason, .. } => Some(format!("* server says goodbye: {reason}")),
        Body::Error { message, .. } => Some(format!("! {message}")),
        _ => None,
    }
}
