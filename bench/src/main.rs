//! `fabric-bench`: benchmarks beside their floors (see BENCHMARKS.md).
//!
//! A tool, not part of the library: it uses quic-fabric's public API only,
//! so its dependencies (anyhow, hdrhistogram, tempfile) stay out of every
//! library user's build.

mod raw;
mod scenarios;

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args();
    // Internal: the raw quinn server child used as the `connections` floor.
    if std::env::args().nth(1).as_deref() == Some("raw-server") {
        let addr = args
            .nth(2)
            .ok_or_else(|| anyhow::anyhow!("raw-server ADDR CERTS"))?
            .parse()?;
        let certs = args
            .next()
            .ok_or_else(|| anyhow::anyhow!("raw-server ADDR CERTS"))?;
        return scenarios::raw_server_main(addr, certs.as_ref()).await;
    }
    quic_fabric::telemetry::init(quic_fabric::telemetry::LogFormat::Text, "error");
    scenarios::run(scenarios::BenchArgs::parse()).await
}
