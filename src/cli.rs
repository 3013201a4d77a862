//! The `fabric` command-line client: argument parsing and the subcommands,
//! on top of the client library. Errors print one line on stderr and exit
//! non-zero.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{ArgGroup, Parser, Subcommand};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::client::{
    Client, ClientConfig, ClientError, Congestion, Event, ReconnectPolicy, Socket,
};
use crate::protocol::json::{client_json, frame_json, publication_json};
use crate::protocol::{
    self, Body, ClientId, ClientInfo, Frame, Payload, Position, Priority, Recovery, error_code,
};
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
    /// Interactive chat in rooms (channels), or broadcast to everyone.
    ///
    /// A typed line goes to the current room (the room joined last), or is
    /// broadcast to every other client while no room is joined. Commands:
    /// /join ROOM (join a room; it becomes the current room), /leave [ROOM],
    /// /who [ROOM] (its members), /to TARGET TEXT (TARGET: a client id, else
    /// a client name, else a user), /list, /ping, /help, /quit. Incoming
    /// lines show where they come from: `[room] alice: text`, `[alice] text`
    /// (a broadcast), `[alice → you] text`, `* bob joined room`.
    Chat {
        /// Exit when the connection is lost instead of reconnecting (and
        /// rejoining the rooms).
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
    /// Subscribe to channels and print their messages as JSON lines.
    ///
    /// Prints {"type":"connected","client_id":…,"node_id":…}, then
    /// {"type":"subscribed","channel":…,"subscribers":N,"recovered":…,
    /// "recovery":…,"epoch":…,"offset":…} per channel (`subscribers` is null
    /// when the namespace keeps no presence; `epoch` and `offset`, the
    /// position, are null when it keeps no history), then one
    /// {"type":"publication","channel":…,"text":…,"id":…,"from":{…}} per
    /// message (`binary`, base64, instead of `text` for binary payloads;
    /// `from` is null for the server's publications; `epoch` and `offset`
    /// in channels with history), and with --events
    /// {"type":"join"|"leave","channel":…,"member":{…}}. With --since, the
    /// recovered publications follow the `subscribed` line. After a
    /// reconnect, the recovered publications come first, then a
    /// `subscribed` line per channel with history saying whether they are
    /// all there (`"recovered":true`) or why not (`recovery`). A refused
    /// subscription exits 1 with the node's reason.
    #[command(name = "sub")]
    Subscribe {
        /// Channels (`[namespace:]name`).
        #[arg(required = true, value_name = "CHANNEL")]
        channels: Vec<String>,
        /// Recover what was published after this position (EPOCH:OFFSET,
        /// from an earlier `publication` line); one channel only.
        #[arg(long, value_name = "EPOCH:OFFSET")]
        since: Option<Position>,
        /// Exit 0 after this many publications (join and leave lines do not
        /// count).
        #[arg(long)]
        count: Option<u64>,
        /// Also print a line when a member joins or leaves a channel.
        #[arg(long)]
        events: bool,
        /// Exit when the connection is lost instead of reconnecting (and
        /// subscribing again).
        #[arg(long)]
        no_reconnect: bool,
    },
    /// Publish TEXT to a channel; exits 0 only when the node acknowledged.
    #[command(name = "pub")]
    Publish {
        /// The channel (`[namespace:]name`).
        channel: String,
        /// The text.
        text: String,
        /// Priority: low, normal or high.
        #[arg(long, default_value = "normal")]
        priority: Priority,
    },
    /// Print a channel's members across the cluster as JSON.
    Presence {
        /// The channel (`[namespace:]name`).
        channel: String,
    },
    /// Print the latest publications of a channel's history as
    /// `publication` lines (like `sub`), oldest first, then
    /// {"type":"history","channel":…,"epoch":…,"offset":…,"count":N,"more":…}
    /// (the channel's current position; `more`: older ones are kept).
    History {
        /// The channel (`[namespace:]name`).
        channel: String,
        /// Most publications (the node caps it at its `max_history_page`
        /// and the channel's history size).
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Only those older than this offset.
        #[arg(long)]
        before: Option<u64>,
    },
    /// Broadcast TEXT to every other client.
    Broadcast {
        /// The text.
        text: String,
        /// Priority: low, normal or high.
        #[arg(long, default_value = "normal")]
        priority: Priority,
    },
    /// Send TEXT to one client (--to) or to every connection of a user
    /// (--user); exits 0 only when the server acknowledged.
    #[command(group(ArgGroup::new("recipient").required(true).args(["to", "user"])))]
    Send {
        /// Recipient client id.
        #[arg(long)]
        to: Option<ClientId>,
        /// Recipient user (a token's subject or a client certificate's
        /// name): every connection of that user, on every node.
        #[arg(long)]
        user: Option<String>,
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
        let token =
            crate::auth::mint_hs256(secret, sub, *ttl, aud.as_deref(), iss.as_deref(), channels)?;
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
    }
    | Command::Subscribe {
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
        Command::Subscribe {
            channels,
            count,
            events,
            since,
            ..
        } => {
            if since.is_some() && channels.len() != 1 {
                anyhow::bail!("--since needs exactly one channel");
            }
            subscribe(client, &channels, count, events, since).await?
        }
        Command::History {
            channel,
            limit,
            before,
        } => {
            let (frames, position, more) = client.history(&channel, limit, before).await?;
            for frame in &frames {
                println!("{}", publication_json(frame));
            }
            println!(
                "{}",
                json!({"type": "history", "channel": channel, "epoch": position.epoch_hex(), "offset": position.offset, "count": frames.len(), "more": more})
            );
        }
        Command::Publish {
            channel,
            text,
            priority,
        } => {
            let id = client
                .publish(&channel, Payload::Text(text), priority)
                .await?;
            println!("{}", json!({"type": "ack", "of": id.to_string()}));
        }
        Command::Presence { channel } => {
            let (members, truncated) = client.presence(&channel).await?;
            let members: Vec<Value> = members.iter().map(client_json).collect();
            println!(
                "{}",
                json!({"channel": channel, "members": members, "truncated": truncated})
            );
        }
        Command::Broadcast { text, priority } => {
            let id = client.broadcast(Payload::Text(text), priority).await?;
            println!("{}", json!({"type": "ack", "of": id.to_string()}));
        }
        Command::Send {
            to,
            user,
            text,
            priority,
        } => {
            let payload = Payload::Text(text);
            let id = match (to, user) {
                (Some(to), _) => client.direct(to, payload, priority).await?,
                (None, Some(user)) => client.send_to_user(&user, payload, priority).await?,
                (None, None) => anyhow::bail!("--to or --user is required"),
            };
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

fn print_connected(client: &Client) {
    println!(
        "{}",
        json!({"type": "connected", "client_id": client.client_id().to_string(), "node_id": client.node_id().to_string()})
    );
}

/// A `subscribed` line of `fabric sub`.
fn subscribed_json(
    channel: &str,
    subscribers: Option<u64>,
    position: Option<Position>,
    recovery: Recovery,
) -> Value {
    json!({
        "type": "subscribed",
        "channel": channel,
        "subscribers": subscribers,
        "recovered": recovery == Recovery::Recovered,
        "recovery": recovery.name(),
        "epoch": position.map(|p| p.epoch_hex()),
        "offset": position.map(|p| p.offset),
    })
}

/// Prints an event as a JSON line, as `listen` and `sub` do: a frame with
/// [`frame_json`], the others as `disconnected`, `reconnected`,
/// `resubscribed` or `closed` lines. An error once the connection ended
/// for good.
fn print_event(event: Option<Event>) -> anyhow::Result<()> {
    match event {
        Some(Event::Frame(frame)) => println!("{}", frame_json(&frame)),
        Some(Event::Disconnected { code, reason }) => {
            println!(
                "{}",
                json!({"type": "disconnected", "code": code, "reason": reason})
            );
        }
        Some(Event::Reconnected {
            client_id,
            node_id,
            session,
        }) => {
            println!(
                "{}",
                json!({"type": "reconnected", "client_id": client_id.to_string(), "node_id": node_id.to_string(), "session": session.map(|s| s.name())})
            );
        }
        Some(Event::Resubscribed { channels, failed }) => {
            let failed: Vec<Value> = failed
                .iter()
                .map(|(channel, reason)| json!({"channel": channel, "reason": reason}))
                .collect();
            println!(
                "{}",
                json!({"type": "resubscribed", "channels": channels, "failed": failed})
            );
        }
        Some(Event::Closed { code, reason }) => {
            println!(
                "{}",
                json!({"type": "closed", "code": code, "reason": reason})
            );
            anyhow::bail!("connection closed: {reason}");
        }
        Some(Event::Subscribed {
            channel,
            position,
            recovery,
        }) => println!("{}", subscribed_json(&channel, None, position, recovery)),
        None => anyhow::bail!("connection closed"),
    }
    Ok(())
}

async fn listen(client: &mut Client, count: Option<u64>) -> anyhow::Result<()> {
    print_connected(client);
    let mut seen = 0u64;
    if count == Some(0) {
        return Ok(());
    }
    loop {
        tokio::select! {
            event = client.next_event() => {
                let frame = matches!(event, Some(Event::Frame(_)));
                print_event(event)?;
                if frame {
                    seen += 1;
                    if Some(seen) == count {
                        return Ok(());
                    }
                }
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// `fabric sub`: subscribes to `channels` (one after another, each line
/// printed once its SubscribeAck came), then prints what they carry.
async fn subscribe(
    client: &mut Client,
    channels: &[String],
    count: Option<u64>,
    events: bool,
    since: Option<Position>,
) -> anyhow::Result<()> {
    print_connected(client);
    let positions = client.handshake().version >= protocol::RECOVERY_VERSION;
    if since.is_some() && !positions {
        anyhow::bail!(
            "--since needs protocol version 3; the node speaks {}",
            client.handshake().version
        );
    }
    for channel in channels {
        if positions {
            let subscription = client
                .subscribe_since(channel, events, since)
                .await
                .with_context(|| format!("cannot subscribe to {channel}"))?;
            println!(
                "{}",
                subscribed_json(
                    channel,
                    subscription.subscribers,
                    subscription.position,
                    subscription.recovery
                )
            );
        } else {
            let subscribers = client
                .subscribe(channel, events)
                .await
                .with_context(|| format!("cannot subscribe to {channel}"))?;
            println!(
                "{}",
                json!({"type": "subscribed", "channel": channel, "subscribers": subscribers})
            );
        }
    }
    if count == Some(0) {
        return Ok(());
    }
    let mut seen = 0u64;
    loop {
        tokio::select! {
            event = client.next_event() => match event {
                Some(Event::Frame(frame)) => match &frame.body {
                    Body::Publish { .. } | Body::Publication { .. } => {
                        println!("{}", publication_json(&frame));
                        seen += 1;
                        if Some(seen) == count {
                            return Ok(());
                        }
                    }
                    // A loss the node tells of (the library then subscribes
                    // again from its position and reports what it got back).
                    Body::Join { .. }
                    | Body::Leave { .. }
                    | Body::Error { .. }
                    | Body::Goodbye { .. }
                    | Body::SubscriptionLost { .. } => {
                        println!("{}", frame_json(&frame));
                    }
                    Body::Unsubscribed { channel, reason } => {
                        println!("{}", frame_json(&frame));
                        if client.subscriptions().is_empty() {
                            anyhow::bail!("the node unsubscribed this client from {channel} ({reason}); no channel left");
                        }
                    }
                    // Broadcasts and directs reach every client: not what `sub` shows.
                    _ => {}
                },
                Some(Event::Resubscribed { channels, failed }) => {
                    let refused: Vec<String> = failed
                        .iter()
                        .map(|(channel, reason)| format!("{channel}: {reason}"))
                        .collect();
                    print_event(Some(Event::Resubscribed { channels, failed }))?;
                    if client.subscriptions().is_empty() {
                        anyhow::bail!("cannot subscribe again after reconnecting: {}", refused.join("; "));
                    }
                }
                other => print_event(other)?,
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// What `/help` prints in the chat.
const CHAT_HELP: &str =
    "  TEXT             say TEXT in the current room, or to everyone while in no room
  /join ROOM       join ROOM (a channel); it becomes the current room
  /leave [ROOM]    leave ROOM (default: the current room)
  /who [ROOM]      who is in ROOM (default: the current room)
  /to TARGET TEXT  send TEXT to one client (TARGET: its id, else its name) or to a user
  /list            connected clients
  /ping            round trip to the node
  /help            this list
  /quit            leave";

async fn chat(client: &mut Client) -> anyhow::Result<()> {
    println!(
        "connected as {} on node {} ({}). Type to broadcast, /join ROOM to talk in a room, /help for commands.",
        client.client_id(),
        client.node_id(),
        client.handshake().server_name
    );
    let mut events = client.take_events();
    let mut rooms = Rooms::default();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line? else { break };
                if !chat_command(client, &mut rooms, line.trim()).await? {
                    break;
                }
            }
            event = events.recv() => match event {
                Some(Event::Frame(frame)) => {
                    if let Some(text) = chat_line(&frame, client.client_id()) {
                        println!("{text}");
                    }
                    if let Body::Unsubscribed { channel, .. } = &frame.body
                        && rooms.forget(channel)
                    {
                        println!("{}", rooms.where_lines_go());
                    }
                }
                Some(Event::Disconnected { reason, .. }) => println!("* connection lost ({reason}); reconnecting"),
                Some(Event::Reconnected {
                    client_id,
                    node_id,
                    session,
                }) => {
                    let resumed = if session == Some(crate::protocol::SessionOutcome::Resumed) {
                        " (session resumed)"
                    } else {
                        ""
                    };
                    println!("* reconnected as {client_id} on node {node_id}{resumed}")
                }
                Some(Event::Resubscribed { channels, failed }) => {
                    if !channels.is_empty() {
                        println!("* rejoined {}", channels.join(", "));
                    }
                    for (channel, reason) in failed {
                        println!("! could not rejoin {channel}: {reason}");
                    }
                    if rooms.keep(&client.subscriptions()) {
                        println!("{}", rooms.where_lines_go());
                    }
                }
                Some(Event::Subscribed { channel, recovery, .. }) => match recovery {
                    Recovery::Recovered | Recovery::NotRequested | Recovery::NoHistory => {}
                    other => println!(
                        "! messages of {channel} sent while you were away could not be recovered ({})",
                        other.name()
                    ),
                },
                Some(Event::Closed { reason, .. }) => anyhow::bail!("disconnected: {reason}"),
                None => anyhow::bail!("disconnected"),
            },
        }
    }
    Ok(())
}

/// The rooms a chat joined, in the order joined: the last one is the
/// current room, where typed lines go.
#[derive(Debug, Default)]
struct Rooms(Vec<String>);

impl Rooms {
    fn current(&self) -> Option<&str> {
        self.0.last().map(String::as_str)
    }

    /// Makes `room` (joined) the current room.
    fn enter(&mut self, room: &str) {
        self.0.retain(|r| r != room);
        self.0.push(room.to_owned());
    }

    /// Forgets `room`; returns whether the current room changed.
    fn forget(&mut self, room: &str) -> bool {
        let was_current = self.current() == Some(room);
        self.0.retain(|r| r != room);
        was_current
    }

    /// Forgets the rooms not in `subscribed`; returns whether the current
    /// room changed.
    fn keep(&mut self, subscribed: &[String]) -> bool {
        let before = self.current().map(str::to_owned);
        self.0.retain(|r| subscribed.contains(r));
        before.as_deref() != self.current()
    }

    /// The room named on a command line, else the current room.
    fn named_or_current(&self, named: &str) -> Option<String> {
        if named.is_empty() {
            self.current().map(str::to_owned)
        } else {
            Some(named.to_owned())
        }
    }

    fn where_lines_go(&self) -> String {
        match self.current() {
            Some(room) => format!("* lines now go to {room}"),
            None => "* lines are now broadcast to everyone".to_owned(),
        }
    }
}

/// Runs one chat input line; returns false to quit. A refusal by the node
/// is shown and the chat goes on; a lost connection ends it.
async fn chat_command(client: &Client, rooms: &mut Rooms, line: &str) -> anyhow::Result<bool> {
    let (command, rest) = line
        .split_once(' ')
        .map_or((line, ""), |(c, r)| (c, r.trim()));
    let result = match command {
        "" => Ok(()),
        "/quit" => return Ok(false),
        "/help" => {
            println!("{CHAT_HELP}");
            Ok(())
        }
        "/list" => chat_list(client).await,
        "/ping" => client
            .ping()
            .await
            .map(|rtt| println!("pong: {:.3} ms", ms(rtt))),
        "/join" => chat_join(client, rooms, rest).await,
        "/leave" => chat_leave(client, rooms, rest).await,
        "/who" => chat_who(client, rooms, rest).await,
        "/to" => chat_to(client, rest).await,
        other if other.starts_with('/') => {
            println!("! unknown command {other} (/help lists them)");
            Ok(())
        }
        _ => {
            let payload = Payload::Text(line.to_owned());
            match rooms.current() {
                Some(room) => client.publish(room, payload, Priority::Normal).await,
                None => client.broadcast(payload, Priority::Normal).await,
            }
            .map(drop)
        }
    };
    match result {
        Ok(()) => Ok(true),
        Err(err @ ClientError::Server { .. }) => {
            println!("! {err}");
            Ok(true)
        }
        Err(err) => Err(err.into()),
    }
}

/// One client (or room member) as a chat line.
fn member_line(c: &ClientInfo, me: ClientId) -> String {
    let user = c
        .user
        .as_ref()
        .map(|u| format!(" ({u})"))
        .unwrap_or_default();
    let you = if c.client_id == me { " (you)" } else { "" };
    format!(
        "  {} {}{user} on node {}{you}",
        c.client_id, c.name, c.node_id
    )
}

async fn chat_list(client: &Client) -> Result<(), ClientError> {
    let (clients, truncated) = client.list().await?;
    for c in &clients {
        println!("{}", member_line(c, client.client_id()));
    }
    if truncated {
        println!("  (list truncated)");
    }
    Ok(())
}

async fn chat_join(client: &Client, rooms: &mut Rooms, room: &str) -> Result<(), ClientError> {
    if room.is_empty() {
        println!("! usage: /join ROOM");
        return Ok(());
    }
    let members = client.subscribe(room, true).await?;
    rooms.enter(room);
    let here = members.map(|n| format!(" ({n} here)")).unwrap_or_default();
    println!("* joined {room}{here}; lines now go to {room}");
    Ok(())
}

async fn chat_leave(client: &Client, rooms: &mut Rooms, named: &str) -> Result<(), ClientError> {
    let Some(room) = rooms.named_or_current(named) else {
        println!("! usage: /leave ROOM (you are in no room)");
        return Ok(());
    };
    client.unsubscribe(&room).await?;
    let moved = rooms.forget(&room);
    println!("* left {room}");
    if moved {
        println!("{}", rooms.where_lines_go());
    }
    Ok(())
}

async fn chat_who(client: &Client, rooms: &Rooms, named: &str) -> Result<(), ClientError> {
    let Some(room) = rooms.named_or_current(named) else {
        println!("! usage: /who ROOM (you are in no room)");
        return Ok(());
    };
    let (members, truncated) = client.presence(&room).await?;
    println!("* {} in {room}:", members.len());
    for m in &members {
        println!("{}", member_line(m, client.client_id()));
    }
    if truncated {
        println!("  (list truncated)");
    }
    Ok(())
}

/// Whom `/to` sends to.
#[derive(Debug, PartialEq, Eq)]
enum Recipient {
    /// One connection.
    Client(ClientId),
    /// Every connection of a user.
    User(String),
}

/// Whom `/to TARGET` means when TARGET is not a client id: the one other
/// client named TARGET; the user of all the clients named TARGET when they
/// belong to one user; the user TARGET when no other client has that name.
/// Several clients of different users (or of none) sharing the name is an
/// error that asks for the id.
fn recipient_by_name(
    target: &str,
    clients: &[ClientInfo],
    me: ClientId,
) -> Result<Recipient, String> {
    let named: Vec<&ClientInfo> = clients
        .iter()
        .filter(|c| c.name == target && c.client_id != me)
        .collect();
    match named.as_slice() {
        [] => Ok(Recipient::User(target.to_owned())),
        [one] => Ok(Recipient::Client(one.client_id)),
        [first, rest @ ..] => match &first.user {
            Some(user) if rest.iter().all(|c| c.user.as_ref() == Some(user)) => {
                Ok(Recipient::User(user.clone()))
            }
            _ => {
                let ids: Vec<String> = named.iter().map(|c| c.client_id.to_string()).collect();
                Err(format!(
                    "{} clients are named {target}: {}; use /to ID TEXT",
                    named.len(),
                    ids.join(", ")
                ))
            }
        },
    }
}

async fn chat_to(client: &Client, rest: &str) -> Result<(), ClientError> {
    let Some((target, text)) = rest.split_once(' ') else {
        println!("! usage: /to TARGET TEXT (TARGET: a client id, a client name or a user)");
        return Ok(());
    };
    let payload = Payload::Text(text.trim_start().to_owned());
    let recipient = match target.parse::<ClientId>() {
        Ok(id) => Recipient::Client(id),
        Err(_) => {
            let (clients, _) = client.list().await?;
            match recipient_by_name(target, &clients, client.client_id()) {
                Ok(recipient) => recipient,
                Err(why) => {
                    println!("! {why}");
                    return Ok(());
                }
            }
        }
    };
    match recipient {
        Recipient::Client(id) => client.direct(id, payload, Priority::Normal).await.map(drop),
        Recipient::User(user) => {
            match client.send_to_user(&user, payload, Priority::Normal).await {
                Err(ClientError::Server { code, .. })
                    if code == error_code::UNKNOWN_USER && user == target =>
                {
                    println!(
                        "! nobody called {target}: no client has that id or name, and no user {target} is connected"
                    );
                    Ok(())
                }
                other => other.map(drop),
            }
        }
    }
}

/// How a received frame shows in the chat (`None`: not shown). `me` is
/// this client: its own lines coming back from a room are not repeated.
fn chat_line(frame: &Frame, me: ClientId) -> Option<String> {
    let from = frame.sender.as_ref().map_or("server", |s| s.name.as_str());
    let text = |p: &Payload| match p {
        Payload::Text(t) => t.clone(),
        Payload::Binary(b) => format!("<{} bytes>", b.len()),
    };
    match &frame.body {
        Body::Broadcast { payload } => Some(format!("[{from}] {}", text(payload))),
        Body::Direct { payload, .. } | Body::UserDirect { payload, .. } => {
            Some(format!("[{from} → you] {}", text(payload)))
        }
        Body::Publish { channel, payload }
        | Body::Publication {
            channel, payload, ..
        } => {
            let mine = frame.sender.as_ref().is_some_and(|s| s.client_id == me);
            (!mine).then(|| format!("[{channel}] {from}: {}", text(payload)))
        }
        Body::Join { channel, member } => Some(format!("* {} joined {channel}", member.name)),
        Body::Leave { channel, member } => Some(format!("* {} left {channel}", member.name)),
        Body::Unsubscribed { channel, reason } => {
            Some(format!("* removed from {channel}: {reason}"))
        }
        Body::Goodbye { reason, .. } => Some(format!("* server says goodbye: {reason}")),
        Body::Error { message, .. } => Some(format!("! {message}")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{NodeId, Sender};

    fn info(name: &str, user: Option<&str>) -> ClientInfo {
        ClientInfo {
            client_id: ClientId::new_random(),
            node_id: NodeId::new_random(),
            name: name.into(),
            user: user.map(str::to_owned),
            connected_at_ms: 0,
        }
    }

    #[test]
    fn to_a_name_picks_the_one_client_else_a_shared_user_else_asks_for_the_id() {
        let me = info("alice", None);
        let bob = info("bob", None);
        let twins = [info("twin", None), info("twin", Some("t"))];
        let zed = [info("zed", Some("z")), info("zed", Some("z"))];
        let mut clients = vec![me.clone(), bob.clone()];
        clients.extend(twins.iter().cloned());
        clients.extend(zed.iter().cloned());

        assert_eq!(
            recipient_by_name("bob", &clients, me.client_id),
            Ok(Recipient::Client(bob.client_id))
        );
        // Two devices of one user: the user gets it on both.
        assert_eq!(
            recipient_by_name("zed", &clients, me.client_id),
            Ok(Recipient::User("z".into()))
        );
        let ambiguous = recipient_by_name("twin", &clients, me.client_id).unwrap_err();
        assert!(
            ambiguous.contains("2 clients are named twin"),
            "{ambiguous}"
        );
        assert!(
            ambiguous.contains(&twins[0].client_id.to_string())
                && ambiguous.contains(&twins[1].client_id.to_string()),
            "{ambiguous}"
        );
        assert!(ambiguous.contains("/to ID"), "{ambiguous}");
        // No client of that name (the sender itself does not count): a user.
        assert_eq!(
            recipient_by_name("carol", &clients, me.client_id),
            Ok(Recipient::User("carol".into()))
        );
        assert_eq!(
            recipient_by_name("alice", &clients, me.client_id),
            Ok(Recipient::User("alice".into()))
        );
    }

    #[test]
    fn chat_help_lists_every_command_indented() {
        assert!(
            CHAT_HELP.lines().all(|l| l.starts_with("  ")),
            "{CHAT_HELP}"
        );
        for command in [
            "/join", "/leave", "/who", "/to", "/list", "/ping", "/help", "/quit",
        ] {
            assert!(CHAT_HELP.contains(command), "{command}");
        }
    }

    #[test]
    fn rooms_track_the_current_room() {
        let mut rooms = Rooms::default();
        assert_eq!(rooms.current(), None);
        rooms.enter("a");
        rooms.enter("b");
        assert_eq!(rooms.current(), Some("b"));
        rooms.enter("a");
        assert_eq!(rooms.current(), Some("a"), "joining again makes it current");
        assert!(!rooms.forget("b"));
        assert_eq!(rooms.current(), Some("a"));
        rooms.enter("c");
        assert!(rooms.keep(&["a".to_owned()]), "c was current and is gone");
        assert_eq!(rooms.current(), Some("a"));
        assert_eq!(rooms.named_or_current(""), Some("a".into()));
        assert_eq!(rooms.named_or_current("x"), Some("x".into()));
        assert!(rooms.forget("a"));
        assert_eq!(
            rooms.where_lines_go(),
            "* lines are now broadcast to everyone"
        );
    }

    #[test]
    fn chat_lines_show_the_room_and_hide_your_own_publications() {
        let me = ClientId::new_random();
        let alice = info("alice", None);
        let mut frame = Frame::new(
            Priority::Normal,
            Body::Publish {
                channel: "lobby".into(),
                payload: Payload::Text("hi".into()),
            },
        );
        assert_eq!(chat_line(&frame, me).as_deref(), Some("[lobby] server: hi"));
        frame.sender = Some(Sender {
            client_id: alice.client_id,
            node_id: alice.node_id,
            name: "alice".into(),
            user: None,
        });
        assert_eq!(chat_line(&frame, me).as_deref(), Some("[lobby] alice: hi"));
        assert_eq!(chat_line(&frame, alice.client_id), None);
        let join = Frame::new(
            Priority::Normal,
            Body::Join {
                channel: "lobby".into(),
                member: alice.clone(),
            },
        );
        assert_eq!(
            chat_line(&join, me).as_deref(),
            Some("* alice joined lobby")
        );
        let leave = Frame::new(
            Priority::Normal,
            Body::Leave {
                channel: "lobby".into(),
                member: alice,
            },
        );
        assert_eq!(chat_line(&leave, me).as_deref(), Some("* alice left lobby"));
    }
}
