//! Logging setup shared by the binaries: `tracing` to stderr, level from
//! `RUST_LOG` (default `info`), text or JSON.

use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber; `default_level` applies when `RUST_LOG` is unset.
pub fn init(format: LogFormat, default_level: &str) {
    let mut filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    // web-transport-quinn warns once per malformed capsule or stream header
    // a peer sends, unmetered: a browser session could flood the log. Its
    // errors still show; `RUST_LOG=web_transport_quinn=...` overrides.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("web_transport_quinn"))
        && let Ok(quiet) = "web_transport_quinn=error".parse()
    {
        filter = filter.add_directive(quiet);
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
