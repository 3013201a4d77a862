//! `fabric-bench`: benchmarks beside their floors (see BENCHMARKS.md).
//!
//! A tool, not part of the library: it uses quic-fabric's public API only,
//! so its dependencies (anyhow, hdrhistogram, tempfile) stay out of every
//! library user's build.

mod channels;
mod history;
mod procs;
mod raw;
mod redis_cluster;
mod scenarios;

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Internal: a raw quinn floor server in a child process
    // (`raw-server MODE ADDR CERTS [CONGESTION]`), started by the
    // scenarios and by bench/lossy.sh.
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("raw-server") {
        let usage = || anyhow::anyhow!("raw-server MODE ADDR CERTS [cubic|new-reno|bbr]");
        let [mode, addr, certs] = args
            .get(2..5)
            .and_then(|a| <&[String; 3]>::try_from(a).ok())
            .ok_or_else(usage)?;
        let congestion = match args.get(5) {
            Some(cc) => clap::ValueEnum::from_str(cc, true).map_err(|_| usage())?,
            None => Default::default(),
        };
        return raw::serve_until_killed(mode.parse()?, addr.parse()?, certs.as_ref(), congestion)
            .await;
    }
    quic_fabric::telemetry::init(quic_fabric::telemetry::LogFormat::Text, "error");
    scenarios::run(scenarios::BenchArgs::parse()).await
}
