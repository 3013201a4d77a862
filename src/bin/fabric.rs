//! `fabric`: the command-line client.

use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = quic_fabric::cli::Cli::parse();
    quic_fabric::telemetry::init(quic_fabric::telemetry::LogFormat::Text, "warn");
    std::process::exit(quic_fabric::cli::run(cli).await);
}
