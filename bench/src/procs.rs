//! The processes a run measures: nodes (`fabric-node`) and raw quinn floor
//! servers run as child processes, so their CPU time and memory are theirs
//! alone; the bench process itself is the client side. CPU time comes from
//! `/proc/PID/stat` (user + system, every thread, in 10 ms ticks), memory
//! from `/proc/PID/status`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use quic_fabric::client::ClientConfig;

/// Linux's fixed unit for the times in `/proc/PID/stat` (USER_HZ).
const TICK: Duration = Duration::from_millis(10);

/// CPU time `pid` has used (user + system, all its threads, finished
/// ones included).
pub fn cpu(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces; fields count from after it.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow::anyhow!("odd /proc/{pid}/stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
    let ticks: u64 = fields
        .get(11..13)
        .ok_or_else(|| anyhow::anyhow!("short /proc/{pid}/stat"))?
        .iter()
        .map(|f| f.parse::<u64>().unwrap_or(0))
        .sum();
    Ok(TICK * ticks as u32)
}

/// Resident memory of `pid`, KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS"))
}

/// CPU time used by a set of server processes and by this (client-side)
/// process between `start` and `stop`.
pub struct CpuMeter {
    servers: Vec<(u32, Duration)>,
    own: Duration,
    wall: Instant,
}

/// What a [`CpuMeter`] measured.
#[derive(Debug, Clone, Copy)]
pub struct CpuUse {
    /// All server processes together.
    pub servers: Duration,
    /// The bench process: the clients.
    pub clients: Duration,
    /// Wall-clock time.
    pub wall: Duration,
}

impl CpuUse {
    /// Microseconds of server CPU per `n` units of work.
    pub fn server_us_per(&self, n: u64) -> f64 {
        self.servers.as_secs_f64() * 1e6 / n.max(1) as f64
    }

    /// Microseconds of client CPU per `n` units of work.
    pub fn client_us_per(&self, n: u64) -> f64 {
        self.clients.as_secs_f64() * 1e6 / n.max(1) as f64
    }
}

impl CpuMeter {
    /// Starts measuring `servers` and this process.
    pub fn start(servers: &[&Proc]) -> anyhow::Result<CpuMeter> {
        Ok(CpuMeter {
            servers: servers
                .iter()
                .map(|p| Ok((p.pid, cpu(p.pid)?)))
                .collect::<anyhow::Result<_>>()?,
            own: cpu(std::process::id())?,
            wall: Instant::now(),
        })
    }

    /// CPU used since `start`.
    pub fn stop(&self) -> anyhow::Result<CpuUse> {
        let mut servers = Duration::ZERO;
        for (pid, before) in &self.servers {
            servers += cpu(*pid)?.saturating_sub(*before);
        }
        Ok(CpuUse {
            servers,
            clients: cpu(std::process::id())?.saturating_sub(self.own),
            wall: self.wall.elapsed(),
        })
    }
}

/// A server in a child process.
pub struct Proc {
    _child: tokio::process::Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its process id.
    pub pid: u32,
}

fn free_udp_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    Ok(std::env::current_exe()?
        .parent()
        .map(Path::to_owned)
        .unwrap_or_default()
        .join(name))
}

async fn spawn(exe: &Path, args: &[String], addr: SocketAddr, ca: &Path) -> anyhow::Result<Proc> {
    anyhow::ensure!(
        exe.exists(),
        "{} not found: build it first (`cargo build --release` at the repository root)",
        exe.display()
    );
    let child = tokio::process::Command::new(exe)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child
        .id()
        .ok_or_else(|| anyhow::anyhow!("child exited at once"))?;
    let mut probe = ClientConfig::new(addr.to_string(), ca.to_owned());
    probe.server_name = Some("localhost".into());
    probe.connect_timeout = Duration::from_millis(300);
    let deadline = Instant::now() + Duration::from_secs(20);
    while quic_fabric::client::probe(&probe).await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "{} did not start", exe.display());
    }
    Ok(Proc {
        _child: child,
        addr,
        pid,
    })
}

/// Starts `fabric-node` (the binary next to this one) on a loopback port,
/// with the certificates in `certs` and `extra` flags, and waits until it
/// answers.
pub async fn node(certs: &Path, extra: &[String]) -> anyhow::Result<Proc> {
    let addr = free_udp_addr()?;
    let mut args = vec![
        "--listen".to_owned(),
        addr.to_string(),
        "--certs-dir".to_owned(),
        certs.display().to_string(),
    ];
    args.extend(extra.iter().cloned());
    spawn(&sibling("fabric-node")?, &args, addr, &certs.join("ca.pem")).await
}

/// Starts this binary's raw quinn floor server (`raw-server MODE ADDR
/// CERTS`) and waits until it answers.
pub async fn raw_server(certs: &Path, mode: &str) -> anyhow::Result<Proc> {
    let addr = free_udp_addr()?;
    let args = vec![
        "raw-server".to_owned(),
        mode.to_owned(),
        addr.to_string(),
        certs.display().to_string(),
    ];
    spawn(
        &std::env::current_exe()?,
        &args,
        addr,
        &certs.join("ca.pem"),
    )
    .await
}

/// UDP datagrams the kernel dropped so far because a socket's receive
/// buffer was full (`RcvbufErrors` in `/proc/net/snmp`, this network
/// namespace): a lost datagram is a QUIC retransmission and a latency spike.
pub fn udp_receive_drops() -> u64 {
    udp_counter("RcvbufErrors")
}

/// UDP datagrams received so far by every socket of this network
/// namespace (`InDatagrams`): per delivery, the packets a delivery costs
/// (data to the client plus the client's acknowledgments back).
pub fn udp_datagrams_in() -> u64 {
    udp_counter("InDatagrams")
}

fn udp_counter(name: &str) -> u64 {
    let Ok(snmp) = std::fs::read_to_string("/proc/net/snmp") else {
        return 0;
    };
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}
