//! `fabric-bench`: benchmarks beside their floors (see BENCHMARKS.md).
//!
//! A tool, not part of the library: it uses quic-fabric's public API only,
//! so its dependencies (anyhow, hdrhistogram, tempfile) stay out of every
//! library user's build.

mod procs;
mod raw;
mod scenarios;

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Internal: a raw quinn floor server in a child process
    // (`raw-server MODE ADDR CERTS`), started by the scenarios.
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("raw-server") {
        let [mode, addr, certs] = args
            .get(2..5)
            .and_then(|a| <&[String; 3]>::try_from(a).ok())
            .ok_or_else(|| anyhow::anyhow!("raw-server MODE ADDR CERTS"))?;
        return raw::serve_until_killed(mode.parse()?, addr.parse()?, certs.as_ref()).await;
    }
    quic_fabric::telemetry::init(quic_fabric::telemetry::LogFormat::Text, "error");
    scenarios::run(scenarios::BenchArgs::parse()).await
}
