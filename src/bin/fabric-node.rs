//! `fabric-node`: runs one quic-fabric node until SIGINT or SIGTERM.

use clap::Parser;
use quic_fabric::telemetry::{self, LogFormat};
use quic_fabric::{NodeArgs, Server};

/// A quic-fabric node: QUIC server for real-time messaging.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    node: NodeArgs,
    /// Log format.
    #[arg(long, env = "FABRIC_LOG_FORMAT", value_enum, default_value_t)]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init(cli.log_format, "info");
    let config = cli.node.into_config()?;
    let server = Server::bind(config)?;
    server.run(quic_fabric::server::shutdown_signal()).await;
    Ok(())
}
