//! `fabric-node`: runs one quic-fabric node until SIGINT or SIGTERM, or
//! performs a maintenance task (`gen-certs`, `health`).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use quic_fabric::client::{ClientConfig, probe};
use quic_fabric::telemetry::{self, LogFormat};
use quic_fabric::{NodeArgs, Server};

/// A quic-fabric node: QUIC server for real-time messaging.
#[derive(Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    task: Option<Task>,
    #[command(flatten)]
    node: NodeArgs,
    /// Log format.
    #[arg(long, env = "FABRIC_LOG_FORMAT", value_enum, default_value_t)]
    log_format: LogFormat,
}

#[derive(Subcommand)]
enum Task {
    /// Generate (or reuse) the dev CA, a server certificate and the
    /// WebTransport dev certificate (renewed when due), then exit.
    GenCerts {
        /// Directory for ca.pem, ca.key, server.pem, server.key and the
        /// WebTransport dev certificate webtransport.pem/.key (the node's
        /// `certs_dir`).
        #[arg(long = "certs-dir", alias = "certs", default_value = "certs")]
        certs_dir: PathBuf,
        /// Comma-separated names (DNS or IP) the server certificate covers.
        #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1,::1")]
        cert_names: Vec<String>,
        /// Also issue a client certificate (mutual TLS) for this user name,
        /// written as client-NAME.pem / client-NAME.key.
        #[arg(long)]
        client: Vec<String>,
    },
    /// Exit 0 when a node accepts QUIC connections with a trusted
    /// certificate (a health check that does not become a client).
    Health {
        /// Node address.
        #[arg(long, default_value = "127.0.0.1:4433")]
        server: String,
        /// CA certificate to verify the node with.
        #[arg(long, default_value = "certs/ca.pem")]
        ca: PathBuf,
        /// TLS name to verify.
        #[arg(long)]
        server_name: Option<String>,
        /// Give up after this long.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init(cli.log_format, "info");
    match cli.task {
        Some(Task::GenCerts {
            certs_dir: certs,
            cert_names,
            client,
        }) => {
            let paths = quic_fabric::tls::ensure_dev_certs(&certs, &cert_names)?;
            println!(
                "CA {} and server certificate {} for {}",
                paths.ca_cert.display(),
                paths.server_cert.display(),
                cert_names.join(", ")
            );
            let web = quic_fabric::tls::WebCert::dev(&certs, &cert_names)?;
            let hash = web
                .hashes()
                .first()
                .map(|h| h.iter().map(|b| format!("{b:02x}")).collect::<String>());
            println!(
                "WebTransport dev certificate {} (SHA-256 {})",
                certs.join("webtransport.pem").display(),
                hash.unwrap_or_default()
            );
            for name in client {
                let id = quic_fabric::tls::issue_dev_client_cert(&certs, &name)?;
                println!(
                    "client certificate {} (key {}) for user {name}",
                    id.cert.display(),
                    id.key.display()
                );
            }
        }
        Some(Task::Health {
            server,
            ca,
            server_name,
            timeout,
        }) => {
            let mut config = ClientConfig::new(server.clone(), ca);
            config.server_name = server_name;
            config.connect_timeout = timeout;
            match probe(&config).await {
                Ok(rtt) => println!(
                    "healthy: {server} answered in {:.1} ms",
                    rtt.as_secs_f64() * 1e3
                ),
                Err(err) => {
                    eprintln!("unhealthy: {err}");
                    std::process::exit(1);
                }
            }
        }
        None => {
            let config = cli.node.into_config()?;
            let server = Server::bind(config)?;
            server.run(quic_fabric::server::shutdown_signal()).await;
        }
    }
    Ok(())
}
