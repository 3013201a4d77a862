//! Node configuration: one struct ([`NodeConfig`]) whose `Default` is a node
//! that works out of the box, filled from an optional TOML file, then
//! environment variables (`FABRIC_*`), then command-line flags ([`NodeArgs`]),
//! each overriding the one before.
//!
//! Every setting is declared once, in the `settings!` invocation below: its
//! documentation, name, type, default and any flag extras, inside the
//! section of the file it belongs to. From that one declaration come the
//! [`NodeConfig`] field and its default, the key in the file
//! (`[section]` then `name = …`), the flag (`--name`, in kebab case, whose
//! help is the documentation and the default), the environment variable
//! (`FABRIC_NAME`) and the entry in [`SETTINGS`].

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::builder::ValueParser;
use clap::{Args, FromArgMatches};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::protocol::{DEFAULT_MAX_FRAME_BYTES, HARD_MAX_FRAME_BYTES, MAX_NAME_BYTES, NodeId};

/// When the node asks new connections to prove their address with a QUIC
/// Retry (one extra round trip; spoofed source addresses cannot answer it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AddressValidation {
    /// Every connection.
    Always,
    /// Only while more than half of `max_pending_handshakes` are in use.
    #[default]
    UnderLoad,
    /// Never.
    Never,
}

/// The QUIC congestion controller of a connection (node or client side:
/// each side controls what it sends).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Congestion {
    /// CUBIC (RFC 9438): loss-based, quinn's own default.
    Cubic,
    /// NewReno (RFC 9002): loss-based, the most conservative.
    NewReno,
    /// BBR (version 1; quinn calls its implementation experimental):
    /// model-based, so random loss does not collapse its window the way it
    /// collapses a loss-based one. The default: on a 50 ms link with 1 %
    /// loss it carried 21x CUBIC's bulk goodput and kept small messages
    /// beside the bulk at half CUBIC's median latency (BENCHMARKS.md,
    /// "Lossy links"); on loopback it measured the same as CUBIC.
    #[default]
    Bbr,
}

impl Congestion {
    /// The quinn factory for this controller.
    pub fn factory(self) -> std::sync::Arc<dyn quinn::congestion::ControllerFactory + Send + Sync> {
        use quinn::congestion::{BbrConfig, CubicConfig, NewRenoConfig};
        match self {
            Congestion::Cubic => std::sync::Arc::new(CubicConfig::default()),
            Congestion::NewReno => std::sync::Arc::new(NewRenoConfig::default()),
            Congestion::Bbr => std::sync::Arc::new(BbrConfig::default()),
        }
    }
}

/// Who may subscribe to the channels of a namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SubscribePolicy {
    /// Every connected client.
    #[default]
    Anyone,
    /// Clients with a user id (a verified token or client certificate).
    Authenticated,
    /// Clients whose token's `channels` claim has a pattern matching the
    /// channel.
    Granted,
}

/// Who may publish to the channels of a namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PublishPolicy {
    /// Every connected client, subscribed or not.
    #[default]
    Anyone,
    /// Clients subscribed to the channel.
    Subscribers,
    /// Clients whose token's `channels` claim has a pattern matching the
    /// channel.
    Granted,
    /// No client: only the server (the admin API) publishes.
    Nobody,
}

/// A channel namespace: the rules for the channels named `NAME:...`.
/// In the file, one `[[channels.namespaces]]` table each; as a flag,
/// `NAME[,subscribe=POLICY][,publish=POLICY][,presence=on|off][,join_leave=on|off][,history_size=N][,history_ttl=DURATION]`,
/// several separated by `;`. Rules left out are the default namespace's
/// defaults (anyone, anyone, on, on, no history).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Namespace {
    /// The namespace (the part of a channel name before the first `:`).
    pub name: String,
    /// Who may subscribe.
    #[serde(default)]
    pub subscribe: SubscribePolicy,
    /// Who may publish.
    #[serde(default)]
    pub publish: PublishPolicy,
    /// Whether members are recorded and may be listed (channel presence).
    #[serde(default = "yes")]
    pub presence: bool,
    /// Whether subscribers that ask for them get Join and Leave events.
    #[serde(default = "yes")]
    pub join_leave: bool,
    /// Publications kept in each channel's history (0: no history).
    #[serde(default)]
    pub history_size: u32,
    /// How long a channel's history lives after its last publication
    /// (0: no history).
    #[serde(default, with = "humantime_serde")]
    pub history_ttl: Duration,
}

fn yes() -> bool {
    true
}

impl Namespace {
    /// A namespace with the default rules.
    pub fn open(name: &str) -> Self {
        Namespace {
            name: name.to_owned(),
            subscribe: SubscribePolicy::Anyone,
            publish: PublishPolicy::Anyone,
            presence: true,
            join_leave: true,
            history_size: 0,
            history_ttl: Duration::ZERO,
        }
    }

    /// The history its channels keep, if any (both size and TTL set).
    pub fn retention(&self) -> Option<crate::bus::Retention> {
        (self.history_size > 0 && !self.history_ttl.is_zero()).then_some(crate::bus::Retention {
            size: self.history_size,
            ttl: self.history_ttl,
        })
    }
}

impl std::str::FromStr for Namespace {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let mut parts = spec.split(',').map(str::trim);
        let name = parts.next().unwrap_or_default();
        let mut namespace = Namespace::open(name);
        let on_off = |key: &str, value: &str| match value {
            "on" | "true" => Ok(true),
            "off" | "false" => Ok(false),
            other => Err(format!("{key}={other}: expected on or off")),
        };
        for part in parts {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected KEY=VALUE"))?;
            let enum_value = |possible: &[&str]| {
                if possible.contains(&value) {
                    Ok(())
                } else {
                    Err(format!(
                        "{key}={value}: expected one of {}",
                        possible.join(", ")
                    ))
                }
            };
            match key {
                "subscribe" => {
                    enum_value(&["anyone", "authenticated", "granted"])?;
                    namespace.subscribe = clap::ValueEnum::from_str(value, false)?;
                }
                "publish" => {
                    enum_value(&["anyone", "subscribers", "granted", "nobody"])?;
                    namespace.publish = clap::ValueEnum::from_str(value, false)?;
                }
                "presence" => namespace.presence = on_off(key, value)?,
                "join_leave" => namespace.join_leave = on_off(key, value)?,
                "history_size" => {
                    namespace.history_size = value
                        .parse()
                        .map_err(|_| format!("{key}={value}: expected a number"))?;
                }
                "history_ttl" => {
                    namespace.history_ttl = humantime::parse_duration(value)
                        .map_err(|e| format!("{key}={value}: {e}"))?;
                }
                other => {
                    return Err(format!(
                        "unknown namespace rule {other:?} (expected subscribe, publish, presence, join_leave, history_size, history_ttl)"
                    ));
                }
            }
        }
        Ok(namespace)
    }
}

impl std::fmt::Display for Namespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let on = |b: bool| if b { "on" } else { "off" };
        write!(
            f,
            "{},subscribe={},publish={},presence={},join_leave={},history_size={},history_ttl={}",
            self.name,
            show_enum(&self.subscribe),
            show_enum(&self.publish),
            on(self.presence),
            on(self.join_leave),
            self.history_size,
            humantime::format_duration(self.history_ttl)
        )
    }
}

/// Largest `history_size` accepted: a channel's history is read whole when
/// a client recovers, so it must stay a bounded read.
pub const MAX_HISTORY_SIZE: u32 = 1_000_000;

/// Largest `max_history_page` accepted.
pub const MAX_HISTORY_PAGE: usize = 10_000;

/// Shortest HS256 secret accepted: 256 bits, as RFC 7518 §3.2 requires.
pub const MIN_SECRET_BYTES: usize = 32;

/// Longest `coalesce_window` accepted: beyond it a held broadcast would be
/// late by more than any real-time client tolerates.
pub const MAX_COALESCE_WINDOW: Duration = Duration::from_secs(1);

/// Why a configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this struct.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: Box<toml::de::Error>,
    },
    /// The config file has a setting outside the section it belongs to
    /// (typically a file written before settings had sections).
    #[error("invalid config file {path}: `{key}` belongs {}", place(.section))]
    Misplaced {
        /// The file.
        path: PathBuf,
        /// The key as the file writes it (`section.name` inside a section).
        key: String,
        /// The section it belongs to; `None` for the top level.
        section: Option<&'static str>,
    },
    /// A setting's environment variable under its old name has a value
    /// its flag would refuse.
    #[error("invalid {var} (the old name of {env}): {message}")]
    LegacyEnv {
        /// The old variable.
        var: &'static str,
        /// Its current name.
        env: &'static str,
        /// What clap said about the value.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Where a setting belongs, for [`ConfigError::Misplaced`].
fn place(section: &Option<&str>) -> String {
    match section {
        Some(section) => {
            format!("in the [{section}] section (write it after a `[{section}]` line)")
        }
        None => "at the top level of the file, before any [section]".into(),
    }
}

/// One node setting, as the file, the environment and the flags name it.
/// [`SETTINGS`] lists them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    /// The [`NodeConfig`] field, which is also the key in the file (inside
    /// `section`) and, in kebab case, the flag.
    pub name: &'static str,
    /// The table of the file the key lives in; `None` for the top level.
    pub section: Option<&'static str>,
    /// The environment variable: `FABRIC_` and the name in upper case.
    pub env: &'static str,
    /// The variable's name before settings were named after their field,
    /// still read when neither `env` nor the flag is set.
    pub legacy_env: Option<&'static str>,
    /// The documentation (one line per line of the doc comment), which is
    /// also the flag's help.
    pub doc: &'static str,
}

impl Setting {
    /// The flag, e.g. `--max-clients`.
    pub fn flag(&self) -> String {
        format!("--{}", self.name.replace('_', "-"))
    }

    /// The key in the file, e.g. `limits.max_clients` (or `listen` at the
    /// top level).
    pub fn key(&self) -> String {
        match self.section {
            Some(section) => format!("{section}.{}", self.name),
            None => self.name.to_owned(),
        }
    }
}

/// What a setting's type brings to its one declaration: how the file
/// writes it, how its flag and environment variable parse it, and how its
/// default is shown in `--help`.
trait SettingValue: Sized {
    /// What the file holds (a humantime string for a `Duration`).
    type File: DeserializeOwned;
    /// The value a file entry stands for.
    fn from_file(file: Self::File) -> Self;
    /// The parser of the flag and environment variable (of the value
    /// inside the `Option` for an optional setting, of one item for a
    /// list).
    fn value_parser() -> ValueParser;
    /// The value as its flag would take it.
    fn show(&self) -> String;
}

/// Types that the file holds as they are and that clap parses by itself;
/// `$show` turns a value back into its flag spelling.
macro_rules! parsed_setting_value {
    ($show:path => $($ty:ty),+ $(,)?) => {$(
        impl SettingValue for $ty {
            type File = Self;
            fn from_file(file: Self) -> Self {
                file
            }
            fn value_parser() -> ValueParser {
                clap::value_parser!($ty).into()
            }
            fn show(&self) -> String {
                $show(self)
            }
        }
    )+};
}

/// A value spelled as `Display` shows it.
fn show_display(value: &impl std::fmt::Display) -> String {
    value.to_string()
}

/// A `clap::ValueEnum` spelled as its flag takes it (the file spells it the
/// same way, kebab-case).
fn show_enum(value: &impl clap::ValueEnum) -> String {
    value
        .to_possible_value()
        .map(|value| value.get_name().to_owned())
        .unwrap_or_default()
}

parsed_setting_value!(show_display => usize, u32, u64, bool, String, SocketAddr);
parsed_setting_value!(show_enum => AddressValidation, Congestion, SubscribePolicy, PublishPolicy);

/// Namespaces: `;`-separated specs in a flag, an array of tables in the file.
impl SettingValue for Vec<Namespace> {
    type File = Self;
    fn from_file(file: Self) -> Self {
        file
    }
    fn value_parser() -> ValueParser {
        ValueParser::new(|spec: &str| spec.parse::<Namespace>())
    }
    fn show(&self) -> String {
        if self.is_empty() {
            "none".into()
        } else {
            self.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(";")
        }
    }
}

impl SettingValue for PathBuf {
    type File = Self;
    fn from_file(file: Self) -> Self {
        file
    }
    fn value_parser() -> ValueParser {
        clap::value_parser!(PathBuf)
    }
    fn show(&self) -> String {
        self.display().to_string()
    }
}

impl SettingValue for Duration {
    type File = humantime_serde::Serde<Duration>;
    fn from_file(file: Self::File) -> Self {
        file.into_inner()
    }
    fn value_parser() -> ValueParser {
        ValueParser::new(humantime::parse_duration)
    }
    fn show(&self) -> String {
        humantime::format_duration(*self).to_string()
    }
}

/// A list: comma-separated in a flag (with `value_delimiter = ','`), an
/// array in the file.
impl SettingValue for Vec<String> {
    type File = Self;
    fn from_file(file: Self) -> Self {
        file
    }
    fn value_parser() -> ValueParser {
        clap::value_parser!(String)
    }
    fn show(&self) -> String {
        if self.is_empty() {
            "none".into()
        } else {
            self.join(",")
        }
    }
}

/// The textual uuid, in the file as in a flag.
impl SettingValue for NodeId {
    type File = uuid::Uuid;
    fn from_file(file: uuid::Uuid) -> Self {
        NodeId(file)
    }
    fn value_parser() -> ValueParser {
        clap::value_parser!(NodeId).into()
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

/// An optional setting: unset by default, set by any layer that names it.
impl<T: SettingValue> SettingValue for Option<T> {
    type File = T::File;
    fn from_file(file: T::File) -> Self {
        Some(T::from_file(file))
    }
    fn value_parser() -> ValueParser {
        T::value_parser()
    }
    fn show(&self) -> String {
        self.as_ref().map_or_else(|| "unset".into(), T::show)
    }
}

/// A flag's help: its setting's documentation on one line, without the
/// final period, then the default the way clap shows one.
fn help_text(doc: &str, default: &str) -> String {
    let text = doc.split_whitespace().collect::<Vec<_>>().join(" ");
    let text = text.strip_suffix('.').unwrap_or(&text);
    format!("{text} [default: {default}]")
}

const ENV_PREFIX: &str = "FABRIC_";

/// `FABRIC_` and `name` in upper case, at compile time (for [`env_name!`]).
const fn env_bytes<const N: usize>(name: &str) -> [u8; N] {
    let (prefix, name) = (ENV_PREFIX.as_bytes(), name.as_bytes());
    let mut out = [0; N];
    let mut i = 0;
    while i < N {
        out[i] = if i < prefix.len() {
            prefix[i]
        } else {
            name[i - prefix.len()].to_ascii_uppercase()
        };
        i += 1;
    }
    out
}

/// A setting's environment variable, `FABRIC_` and its name in upper case,
/// as the `&'static str` clap and [`SETTINGS`] want.
macro_rules! env_name {
    ($name:ident) => {{
        const NAME: &str = stringify!($name);
        const BYTES: [u8; ENV_PREFIX.len() + NAME.len()] = env_bytes(NAME);
        const ENV: &str = match std::str::from_utf8(&BYTES) {
            Ok(env) => env,
            Err(_) => panic!("setting names are ASCII"),
        };
        ENV
    }};
}

/// Declares every setting once and generates from that: [`NodeConfig`] and
/// its `Default`, [`NodeArgs`] (one flag and environment variable per
/// setting) and its overlay, the file's structs (one per section) and
/// their overlay, and [`SETTINGS`].
///
/// Per setting: its doc comment (the field's documentation and the flag's
/// help), then optionally `#[arg(...)]` (clap extras: aliases,
/// `value_delimiter`, `hide_env_values`, `requires`) and
/// `#[legacy_env = "OLD_NAME"]`, then `name: Type = default`. The first
/// block holds the top-level keys of the file, each `[section] { ... }`
/// after it the keys of that table.
macro_rules! settings {
    (
        top {
            $(
                $(#[doc = $tdoc:literal])*
                $(#[arg($($targ:tt)*)])?
                $(#[legacy_env = $tlegacy:literal])?
                $tname:ident : $tty:ty = $tdefault:expr
            ),* $(,)?
        }
        $(
            [$section:ident] {
                $(
                    $(#[doc = $doc:literal])*
                    $(#[arg($($arg:tt)*)])?
                    $(#[legacy_env = $legacy:literal])?
                    $name:ident : $ty:ty = $default:expr
                ),* $(,)?
            }
        )*
    ) => {
        settings!(@flat
            $({
                section: None,
                heading: None::<&'static str>,
                docs: [$($tdoc)*],
                arg: [$($($targ)*)?],
                legacy: [$($tlegacy)?],
                name: $tname,
                ty: $tty,
                default: $tdefault
            })*
            $($({
                section: Some(stringify!($section)),
                heading: Some(concat!("[", stringify!($section), "] section")),
                docs: [$($doc)*],
                arg: [$($($arg)*)?],
                legacy: [$($legacy)?],
                name: $name,
                ty: $ty,
                default: $default
            })*)*
        );

        /// The TOML file: the top-level keys, then one table per section.
        /// Every key may be left out; an unknown one is an error.
        #[derive(Default, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        struct ConfigFile {
            $($tname: Option<<$tty as SettingValue>::File>,)*
            $($section: sections::$section::Table,)*
        }

        /// One module per section of the file, holding its table.
        mod sections {
            $(
                pub(super) mod $section {
                    use super::super::*;

                    #[derive(Default, Deserialize)]
                    #[serde(default, deny_unknown_fields)]
                    pub(in super::super) struct Table {
                        $(pub(in super::super) $name: Option<<$ty as SettingValue>::File>,)*
                    }
                }
            )*
        }

        impl ConfigFile {
            /// Writes every setting the file names over `config`.
            fn apply(self, config: &mut NodeConfig) {
                $(if let Some(value) = self.$tname {
                    config.$tname = SettingValue::from_file(value);
                })*
                $($(if let Some(value) = self.$section.$name {
                    config.$name = SettingValue::from_file(value);
                })*)*
            }
        }

        /// The sections (tables) of the file.
        const SECTIONS: &[&str] = &[$(stringify!($section)),*];
    };

    (@flat $({
        section: $sec:expr,
        heading: $heading:expr,
        docs: [$($doc:literal)*],
        arg: [$($arg:tt)*],
        legacy: [$($legacy:literal)?],
        name: $name:ident,
        ty: $ty:ty,
        default: $default:expr
    })*) => {
        /// Everything a node needs to run. Each field is a setting of the
        /// file, the environment and the flags (see [`SETTINGS`]).
        #[derive(Debug, Clone)]
        pub struct NodeConfig {
            $(
                $(#[doc = $doc])*
                pub $name: $ty,
            )*
        }

        impl Default for NodeConfig {
            fn default() -> Self {
                NodeConfig {
                    $($name: $default,)*
                }
            }
        }

        /// Every setting, grouped by section in the order of the file.
        pub const SETTINGS: &[Setting] = &[$(
            Setting {
                name: stringify!($name),
                section: $sec,
                env: env_name!($name),
                // The old name if there is one, else `None`.
                legacy_env: [$(Some($legacy),)? None][0],
                doc: concat!($($doc, "\n"),*),
            },
        )*];

        /// Node flags; every one also reads its `FABRIC_*` environment
        /// variable (see [`SETTINGS`]). Unset flags leave the file's (or the
        /// default) value alone.
        #[derive(Debug, Clone, Default, Args)]
        pub struct NodeArgs {
            /// TOML config file; flags and environment override it.
            #[arg(long, env = "FABRIC_CONFIG")]
            pub config: Option<PathBuf>,
            $(
                #[doc = concat!(
                    "[`NodeConfig::", stringify!($name), "`] when its flag or ",
                    "environment variable is set (an optional setting is then `Some(Some(_))`)."
                )]
                // To clap, an optional setting is an `Option<Option<T>>`, which
                // would take the flag without a value: `num_args = 1` insists
                // on one, as for every other setting.
                #[arg(
                    long,
                    env = env_name!($name),
                    num_args = 1,
                    value_parser = <$ty as SettingValue>::value_parser(),
                    help = help_text(
                        concat!($($doc, "\n"),*),
                        &<$ty as SettingValue>::show(&($default)),
                    ),
                    help_heading = $heading,
                    $($arg)*
                )]
                pub $name: Option<$ty>,
            )*
        }

        impl NodeArgs {
            /// Writes every setting whose flag or environment variable is set
            /// over `config`.
            fn overlay(self, config: &mut NodeConfig) {
                $(if let Some(value) = self.$name {
                    config.$name = value;
                })*
            }

            /// Fills the settings that neither their flag nor their
            /// environment variable set from their environment variable's
            /// old name, if that is set.
            fn with_legacy_env(mut self) -> Result<Self, ConfigError> {
                $($(
                    if self.$name.is_none()
                        && let Some(value) = std::env::var_os($legacy)
                    {
                        self.$name = parse_legacy_env($legacy, stringify!($name), value)?.$name;
                    }
                )?)*
                Ok(self)
            }
        }

        #[cfg(test)]
        impl NodeConfig {
            /// The value of setting `name` as its flag would take it.
            fn show(&self, name: &str) -> Option<String> {
                match name {
                    $(stringify!($name) => Some(SettingValue::show(&self.$name)),)*
                    _ => None,
                }
            }
        }
    };
}

settings! {
    top {
        /// UDP address to listen on.
        listen: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 4433)),
        /// Human-readable node name, reported in HandshakeAck and stats.
        name: String = "quic-fabric".into(),
        /// Node id (a uuid); a fresh random one at each start when unset, so
        /// restarts look like new nodes.
        node_id: Option<NodeId> = None,
    }

    // Where the node's certificate comes from.
    [tls] {
        /// Directory where dev certificates are generated and looked up.
        #[arg(alias = "certs")]
        #[legacy_env = "FABRIC_CERTS"]
        certs_dir: PathBuf = PathBuf::from("certs"),
        /// Certificate chain (PEM); with `key`, replaces the generated dev
        /// certificate.
        #[arg(requires = "key")]
        cert: Option<PathBuf> = None,
        /// Private key (PEM) for `cert`.
        #[arg(requires = "cert")]
        key: Option<PathBuf> = None,
        /// Names (DNS or IP) the generated dev certificate is valid for,
        /// comma-separated.
        #[arg(value_delimiter = ',')]
        cert_names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
    }

    // QUIC transport parameters: what quinn's TransportConfig is built from.
    [transport] {
        /// A connection with no packets for this long is closed.
        idle_timeout: Duration = Duration::from_secs(30),
        /// How often the node sends QUIC keep-alives on quiet connections
        /// (0s = never).
        #[legacy_env = "FABRIC_KEEP_ALIVE"]
        keep_alive_interval: Duration = Duration::from_secs(10),
        /// Unidirectional streams a client may have open at once (at least 3:
        /// one per priority).
        #[legacy_env = "FABRIC_MAX_STREAMS"]
        max_streams_per_connection: u32 = 3,
        /// QUIC flow-control window per stream, in bytes.
        stream_receive_window: u32 = 1024 * 1024,
        /// QUIC flow-control window per connection, in bytes.
        connection_receive_window: u32 = 4 * 1024 * 1024,
        /// Unacknowledged bytes the node may have in flight per connection.
        send_window: u64 = 4 * 1024 * 1024,
        /// Congestion controller for what the node sends: `cubic`,
        /// `new-reno` or `bbr` (see README, "Lossy networks").
        congestion_controller: Congestion = Congestion::Bbr,
        /// While the node runs late (its CPU saturated), a broadcast to a
        /// client waits until this long after that client's previous write,
        /// so several go out together in fewer packets. Replies, direct
        /// messages, high-priority frames and backlogs never wait, and
        /// nothing waits on a node that keeps up (0s = never hold back; at
        /// most 1s and half of slow_consumer_stall; README, "Batching under
        /// load").
        coalesce_window: Duration = Duration::from_millis(20),
    }

    // What one client, one IP address or all clients together may cost the
    // node: admission, sizes, queues and rates.
    [limits] {
        /// Clients this node accepts at once; the next one is refused with
        /// SERVER_FULL.
        max_clients: usize = 10_000,
        /// Connections allowed to be mid-handshake at once, beyond
        /// `max_clients`; further connection attempts are refused before TLS.
        max_pending_handshakes: usize = 1_000,
        /// When new connections must prove their address with a QUIC Retry.
        address_validation: AddressValidation = AddressValidation::UnderLoad,
        /// Time a new connection has to complete the application handshake.
        handshake_timeout: Duration = Duration::from_secs(10),
        /// Connections at once from one IP address (0 = unlimited).
        max_connections_per_ip: usize = 256,
        /// New connections per second from one IP address (0 = unlimited).
        connection_rate_per_ip: u32 = 20,
        /// Size of each IP address's token bucket for new connections: the
        /// connections it may open at once (refilled at
        /// `connection_rate_per_ip` per second; not added to the rate).
        connection_burst_per_ip: u32 = 100,
        /// Largest frame payload accepted, in bytes (at most 16 MiB).
        max_message_bytes: usize = DEFAULT_MAX_FRAME_BYTES,
        /// Longest client name accepted in a handshake, in bytes (at most 1024).
        max_name_bytes: usize = MAX_NAME_BYTES,
        /// Largest Handshake frame accepted from a not yet authenticated peer
        /// (capped by `max_message_bytes`).
        max_handshake_bytes: usize = 16 * 1024,
        /// Most entries returned in one ClientList.
        max_list_clients: usize = 10_000,
        /// Messages queued per client and priority before it counts as a slow
        /// consumer.
        outbound_queue_len: usize = 1024,
        /// Bytes queued per client (all priorities) before it counts as a slow
        /// consumer.
        max_queued_bytes: usize = 16 * 1024 * 1024,
        /// Bytes queued for all clients together; beyond it new messages are
        /// refused with SERVER_BUSY instead of growing memory.
        max_total_queued_bytes: usize = 1024 * 1024 * 1024,
        /// While the node-wide queue budget is exhausted, a client whose queue
        /// has held bytes without any being written for this long counts as a
        /// slow consumer and is disconnected, so clients that stopped reading
        /// cannot block everyone else whatever the budgets are.
        slow_consumer_stall: Duration = Duration::from_secs(2),
        /// Messages per second each client may send (0 = unlimited).
        #[arg(alias = "rate-limit")]
        #[legacy_env = "FABRIC_RATE_LIMIT"]
        rate_limit_messages: u32 = 1_000,
        /// Size of each client's token bucket: the frames it may send at once.
        /// The bucket starts full and refills at `rate_limit_messages` per
        /// second; the burst is the bucket's size, not added to the rate.
        rate_limit_burst: u32 = 2_000,
        /// Rate-limited frames tolerated within `rate_limit_strike_window`
        /// before the client is disconnected (close code 10).
        rate_limit_strikes: u32 = 1_000,
        /// Window for `rate_limit_strikes`.
        rate_limit_strike_window: Duration = Duration::from_secs(10),
        /// Whether an anonymous client's rate-limit state follows its IP
        /// address across reconnects (an authenticated client's follows its
        /// user). Turn off behind a proxy that hides client addresses, where
        /// every anonymous client would inherit every other's debt.
        rate_limit_anonymous_by_ip: bool = true,
        /// Channels one client may be subscribed to at once; one more is
        /// refused with TOO_MANY_SUBSCRIPTIONS.
        max_subscriptions: usize = 128,
        /// Most members returned in one Presence answer (`truncated` tells
        /// when there were more).
        max_presence_members: usize = 1_000,
    }

    // Channels: the rules of the default namespace (channel names without
    // `:`) and the other namespaces.
    [channels] {
        /// Who may subscribe to channels of the default namespace: `anyone`,
        /// `authenticated` or `granted` (by the token's `channels` claim).
        channel_subscribe: SubscribePolicy = SubscribePolicy::Anyone,
        /// Who may publish to channels of the default namespace: `anyone`,
        /// `subscribers`, `granted` or `nobody` (only the admin API).
        channel_publish: PublishPolicy = PublishPolicy::Anyone,
        /// Whether channels of the default namespace keep presence (their
        /// members can be listed, and SubscribeAck counts them).
        channel_presence: bool = true,
        /// Whether subscribers of the default namespace's channels that ask
        /// for them get Join and Leave events.
        channel_join_leave: bool = true,
        /// Publications kept in the history of each channel of the default
        /// namespace (0: no history; with `history_ttl`, both must be set).
        history_size: u32 = 0,
        /// How long the history of a channel of the default namespace lives
        /// after its last publication (0: no history).
        history_ttl: Duration = Duration::ZERO,
        /// How long a channel's position (epoch and latest offset) is kept
        /// after its last publication or read, at least every `history_ttl`:
        /// positions outlive the publications, so a client that was away
        /// longer than `history_ttl` is told it missed something rather than
        /// given a new epoch.
        history_meta_ttl: Duration = Duration::from_secs(24 * 3600),
        /// Most publications one history request returns.
        max_history_page: usize = 100,
        /// How long the cluster remembers an Idempotent message's key and
        /// outcome: a retry within it is not handled again.
        dedupe_window: Duration = Duration::from_secs(120),
        /// Other namespaces, each `NAME[,subscribe=…][,publish=…][,presence=on|off][,join_leave=on|off][,history_size=N][,history_ttl=DURATION]`,
        /// `;`-separated (in the file: `[[channels.namespaces]]` tables); a
        /// channel `NAME:…` of an undeclared namespace is refused with
        /// UNKNOWN_NAMESPACE.
        #[arg(value_delimiter = ';')]
        namespaces: Vec<Namespace> = Vec::new(),
    }

    // Resumable sessions: what a client gets back when it reconnects.
    [sessions] {
        /// How long a session whose connection was lost waits for its client
        /// to resume it (same client id, stored direct messages); 0 turns
        /// sessions off.
        session_resume_window: Duration = Duration::from_secs(60),
        /// The cluster's secret for resume tokens (at least 32 bytes, the same
        /// on every node). Unset: a random one kept in `certs_dir/session.key`
        /// when the node uses dev certificates, else sessions are off.
        #[arg(hide_env_values = true)]
        session_secret: Option<String> = None,
        /// A previous session secret whose tokens are still accepted (for
        /// rotating the secret without ending sessions).
        #[arg(hide_env_values = true)]
        session_secret_old: Option<String> = None,
        /// Most direct messages stored for one session waiting for a resume;
        /// more get INBOX_FULL.
        session_inbox_len: usize = 1000,
        /// Most bytes of direct messages stored for one session waiting for a
        /// resume.
        session_inbox_bytes: usize = 1024 * 1024,
        /// How long a resume token is accepted after it was issued (a
        /// connection gets a new one at every resume, and at half this
        /// lifetime while it lasts).
        session_token_lifetime: Duration = Duration::from_secs(24 * 3600),
    }

    // The cluster bus: Redis, and what any bus engine needs.
    [cluster] {
        /// Redis URL (`redis://`, `rediss://`, with optional `user:password@`);
        /// unset runs a single node with the in-memory bus.
        #[arg(alias = "redis")]
        redis_url: Option<String> = None,
        /// CA certificate (PEM) that a `rediss://` server must chain to, instead
        /// of the public web roots.
        redis_ca: Option<PathBuf> = None,
        /// Redis Sentinel URLs (`redis://host:26379`, comma-separated), instead
        /// of `redis_url`: the bus uses the master they name
        /// (`redis_sentinel_master`) and follows it through failovers. A user
        /// and password in the URLs are used for the sentinels and the master.
        #[arg(value_delimiter = ',')]
        redis_sentinel: Vec<String> = Vec::new(),
        /// The master name the sentinels monitor (with `redis_sentinel`).
        redis_sentinel_master: Option<String> = None,
        /// Redis Cluster seed URLs (`redis://host:port`, comma-separated),
        /// instead of `redis_url`: the bus uses sharded pub/sub and hash-tagged
        /// keys (CLUSTER.md, "Redis Cluster") and follows resharding and
        /// failovers. A user and password in the URLs are used for every node.
        #[arg(value_delimiter = ',')]
        redis_cluster: Vec<String> = Vec::new(),
        /// Prefix of every Redis key and channel this cluster uses.
        redis_prefix: String = "fabric".into(),
        /// Time to establish a Redis connection.
        redis_connect_timeout: Duration = Duration::from_secs(1),
        /// Time to wait for a Redis reply.
        redis_response_timeout: Duration = Duration::from_secs(1),
        /// A node that stops refreshing its heartbeat for this long is dead: its
        /// clients leave presence and nothing is routed to it.
        node_ttl: Duration = Duration::from_secs(10),
        /// How often a node refreshes its heartbeat (at most half of `node_ttl`).
        heartbeat_interval: Duration = Duration::from_secs(2),
        /// How long a cross-node direct message waits for the target node's
        /// delivery receipt before the sender gets CLUSTER_UNAVAILABLE.
        delivery_timeout: Duration = Duration::from_secs(5),
        /// Cluster operations queued for Redis before new ones fail fast.
        bus_queue_len: usize = 65_536,
    }

    // Who may connect: JWT in the Handshake, client certificates.
    [auth] {
        /// HS256 shared secret (at least 32 bytes); turns JWT auth on. The key
        /// is the UTF-8 bytes of this string as they are (not base64-decoded),
        /// which is what other JWT libraries do with a string secret.
        #[arg(hide_env_values = true)]
        auth_jwt_secret: Option<String> = None,
        /// Public key PEM (RSA → RS256, P-256 → ES256, Ed25519 → EdDSA); turns
        /// JWT auth on.
        auth_jwt_public_key: Option<PathBuf> = None,
        /// JWKS file (keys chosen by `kid`); turns JWT auth on.
        auth_jwks: Option<PathBuf> = None,
        /// Accepted token audiences (`aud`), comma-separated; none = not checked.
        #[arg(value_delimiter = ',')]
        auth_audience: Vec<String> = Vec::new(),
        /// Accepted token issuers (`iss`), comma-separated; none = not checked.
        #[arg(value_delimiter = ',')]
        auth_issuer: Vec<String> = Vec::new(),
        /// Clock skew tolerated on `exp` and `nbf`.
        auth_leeway: Duration = Duration::from_secs(30),
        /// CA (PEM) client certificates must chain to; turns mutual TLS on.
        auth_client_ca: Option<PathBuf> = None,
    }

    // Browsers: WebTransport on the QUIC port, and the demo page.
    [web] {
        /// Serve WebTransport (ALPN `h3`) on the QUIC port, so that browsers
        /// can connect (PROTOCOL.md section 12).
        webtransport: bool = true,
        /// URL path of WebTransport sessions; other paths get 404.
        webtransport_path: String = "/fabric".into(),
        /// Serve browsers the self-signed dev certificate of `certs_dir`
        /// (trusted by its hash) even though `cert` and `key` are set: for
        /// development clusters whose CA browsers do not trust. Without
        /// `cert` and `key` browsers always get it.
        webtransport_dev_cert: bool = false,
        /// Web origins (`scheme://host[:port]`) whose pages may open
        /// WebTransport sessions and read the discovery endpoint,
        /// comma-separated, or `*` for any; empty allows pages served from
        /// loopback only (`localhost`, `127.0.0.1`, `[::1]`, any port).
        #[arg(value_delimiter = ',')]
        web_origins: Vec<String> = Vec::new(),
        /// TCP address of the demo chat page and the WebTransport discovery
        /// endpoint (`GET /webtransport.json`); off when unset.
        #[arg(alias = "web")]
        web_listen: Option<SocketAddr> = None,
        /// The WebTransport URL the page and the discovery endpoint advertise
        /// (behind a load balancer: its address); unset: the host the page
        /// was loaded from, this node's QUIC port and `webtransport_path`.
        webtransport_url: Option<String> = None,
    }

    // Running the node: its HTTP endpoints, and how it stops.
    [operations] {
        /// TCP address of the Prometheus endpoint (`GET /metrics`); off when
        /// unset.
        #[arg(alias = "metrics")]
        #[legacy_env = "FABRIC_METRICS"]
        metrics_listen: Option<SocketAddr> = None,
        /// TCP address of the admin HTTP API; off when unset.
        #[arg(alias = "admin")]
        #[legacy_env = "FABRIC_ADMIN"]
        admin_listen: Option<SocketAddr> = None,
        /// Bearer token the admin API requires (at least 16 characters;
        /// mandatory when `admin_listen` is not a loopback address).
        #[arg(hide_env_values = true)]
        admin_token: Option<String> = None,
        /// On drain or shutdown, how long clients get to leave by themselves.
        shutdown_grace: Duration = Duration::from_secs(5),
        /// How long a draining node keeps refusing new connections (instead of
        /// vanishing) after it started draining, so that reconnects a load
        /// balancer still sends here are turned away at once.
        drain_linger: Duration = Duration::from_secs(2),
    }
}

impl NodeConfig {
    /// The rules of the default namespace (channel names without `:`).
    pub fn default_namespace(&self) -> Namespace {
        Namespace {
            name: String::new(),
            subscribe: self.channel_subscribe,
            publish: self.channel_publish,
            presence: self.channel_presence,
            join_leave: self.channel_join_leave,
            history_size: self.history_size,
            history_ttl: self.history_ttl,
        }
    }

    fn validate_sessions(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.session_resume_window.is_zero() {
            return Ok(());
        }
        for (name, secret) in [
            ("session_secret", &self.session_secret),
            ("session_secret_old", &self.session_secret_old),
        ] {
            if let Some(secret) = secret
                && secret.len() < crate::session::MIN_SECRET_BYTES
            {
                return invalid(format!(
                    "{name} must be at least {} bytes, got {}",
                    crate::session::MIN_SECRET_BYTES,
                    secret.len()
                ));
            }
        }
        if self.session_inbox_len == 0 || self.session_inbox_bytes == 0 {
            return invalid("session_inbox_len and session_inbox_bytes must be at least 1".into());
        }
        if self.session_token_lifetime < Duration::from_secs(2) {
            return invalid(format!(
                "session_token_lifetime must be at least 2s, got {}",
                humantime::format_duration(self.session_token_lifetime)
            ));
        }
        if self.session_token_lifetime < self.session_resume_window {
            return invalid(format!(
                "session_token_lifetime ({}) must be at least session_resume_window ({})",
                humantime::format_duration(self.session_token_lifetime),
                humantime::format_duration(self.session_resume_window)
            ));
        }
        Ok(())
    }

    fn validate_channels(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.max_subscriptions == 0 {
            return invalid("max_subscriptions must be at least 1".into());
        }
        if self.dedupe_window < Duration::from_secs(1) {
            return invalid(format!(
                "dedupe_window must be at least 1s, got {}",
                humantime::format_duration(self.dedupe_window)
            ));
        }
        if self.max_history_page == 0 || self.max_history_page > MAX_HISTORY_PAGE {
            return invalid(format!(
                "max_history_page must be 1..={MAX_HISTORY_PAGE}, got {}",
                self.max_history_page
            ));
        }
        // A Presence answer must fit in one frame, like a client list.
        let entry_bytes =
            16 + 16 + 8 + self.max_name_bytes + 1 + 8 + crate::protocol::MAX_USER_BYTES + 8;
        let most = (HARD_MAX_FRAME_BYTES - 1024) / entry_bytes;
        if self.max_presence_members == 0 || self.max_presence_members > most {
            return invalid(format!(
                "max_presence_members must be 1..={most} with max_name_bytes {} (a presence answer must fit in one 16 MiB frame), got {}",
                self.max_name_bytes, self.max_presence_members
            ));
        }
        let jwt = self.auth_jwt_secret.is_some()
            || self.auth_jwt_public_key.is_some()
            || self.auth_jwks.is_some();
        let mut seen = std::collections::HashSet::new();
        let default = self.default_namespace();
        for namespace in std::iter::once(&default).chain(&self.namespaces) {
            let label = if namespace.name.is_empty() {
                "the default namespace".to_owned()
            } else {
                format!("namespace {:?}", namespace.name)
            };
            if !namespace.name.is_empty() {
                let probe = format!("{}:x", namespace.name);
                if let Err(why) = crate::protocol::valid_channel(&probe) {
                    return invalid(format!("{label}: {why}"));
                }
                if !seen.insert(namespace.name.as_str()) {
                    return invalid(format!("{label} is declared twice"));
                }
            }
            let granted = namespace.subscribe == SubscribePolicy::Granted
                || namespace.publish == PublishPolicy::Granted;
            if granted && !jwt {
                return invalid(format!(
                    "{label}: `granted` needs JWT authentication (auth_jwt_secret, auth_jwt_public_key or auth_jwks), whose tokens carry the `channels` claim"
                ));
            }
            let (size, ttl) = (namespace.history_size, namespace.history_ttl);
            if (size == 0) != ttl.is_zero() {
                return invalid(format!(
                    "{label}: history needs both history_size and history_ttl (got {size} and {}); set both, or neither for no history",
                    humantime::format_duration(ttl)
                ));
            }
            if size > MAX_HISTORY_SIZE {
                return invalid(format!(
                    "{label}: history_size must be at most {MAX_HISTORY_SIZE}, got {size}"
                ));
            }
            if ttl < Duration::from_secs(1) && !ttl.is_zero() {
                return invalid(format!(
                    "{label}: history_ttl must be at least 1s, got {}",
                    humantime::format_duration(ttl)
                ));
            }
            if ttl > self.history_meta_ttl {
                return invalid(format!(
                    "{label}: history_ttl ({}) must not exceed history_meta_ttl ({}): positions must outlive the publications",
                    humantime::format_duration(ttl),
                    humantime::format_duration(self.history_meta_ttl)
                ));
            }
        }
        Ok(())
    }

    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let parse_error = |source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        };
        let table: toml::Table = toml::from_str(&text).map_err(parse_error)?;
        if let Some((key, section)) = misplaced_key(&table) {
            return Err(ConfigError::Misplaced {
                path: path.to_owned(),
                key,
                section,
            });
        }
        let file: ConfigFile = toml::from_str(&text).map_err(parse_error)?;
        let mut config = NodeConfig::default();
        file.apply(&mut config);
        Ok(config)
    }

    /// One Redis target at most: a URL, sentinels (with a master name) or
    /// a Redis Cluster.
    fn validate_redis(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.into()));
        if !self.redis_cluster.is_empty()
            && (self.redis_url().is_some() || !self.redis_sentinel.is_empty())
        {
            return invalid(
                "redis_cluster excludes redis_url and redis_sentinel: give one Redis target",
            );
        }
        match (
            self.redis_url(),
            self.redis_sentinel.is_empty(),
            &self.redis_sentinel_master,
        ) {
            (Some(_), false, _) => {
                invalid("redis_url and redis_sentinel exclude each other: give one")
            }
            (_, false, None) => invalid(
                "redis_sentinel needs redis_sentinel_master (the name the sentinels monitor)",
            ),
            (_, true, Some(_)) => {
                invalid("redis_sentinel_master needs redis_sentinel (the sentinels' URLs)")
            }
            (_, false, Some(name)) if name.is_empty() => {
                invalid("redis_sentinel_master must not be empty")
            }
            _ => Ok(()),
        }
    }

    /// `redis_url`, where an empty one (e.g. `FABRIC_REDIS_URL=` to clear
    /// it in an override) means none.
    fn redis_url(&self) -> Option<&str> {
        self.redis_url.as_deref().filter(|url| !url.is_empty())
    }

    /// Where the cluster bus's Redis is, if anywhere.
    pub fn redis_target(&self) -> Option<crate::bus::master::RedisTarget> {
        use crate::bus::master::RedisTarget;
        if !self.redis_cluster.is_empty() {
            return Some(RedisTarget::Cluster {
                seeds: self.redis_cluster.clone(),
            });
        }
        match (self.redis_url(), &self.redis_sentinel_master) {
            (Some(url), _) => Some(RedisTarget::Url(url.to_owned())),
            (None, Some(master)) if !self.redis_sentinel.is_empty() => {
                Some(RedisTarget::Sentinel {
                    sentinels: self.redis_sentinel.clone(),
                    master: master.clone(),
                })
            }
            _ => None,
        }
    }

    /// Checks ranges and combinations.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.max_message_bytes == 0 || self.max_message_bytes > HARD_MAX_FRAME_BYTES {
            return invalid(format!(
                "max_message_bytes must be 1..={HARD_MAX_FRAME_BYTES}, got {}",
                self.max_message_bytes
            ));
        }
        if self.max_clients == 0 {
            return invalid("max_clients must be at least 1".into());
        }
        if self.max_streams_per_connection < 3 {
            return invalid(format!(
                "max_streams_per_connection must be at least 3 (one per priority), got {}",
                self.max_streams_per_connection
            ));
        }
        if self.outbound_queue_len == 0 {
            return invalid("outbound_queue_len must be at least 1".into());
        }
        if self.max_queued_bytes < self.max_message_bytes {
            return invalid(format!(
                "max_queued_bytes ({}) must be at least max_message_bytes ({})",
                self.max_queued_bytes, self.max_message_bytes
            ));
        }
        if self.slow_consumer_stall.is_zero() {
            return invalid("slow_consumer_stall must be above zero".into());
        }
        if self.coalesce_window > MAX_COALESCE_WINDOW {
            return invalid(format!(
                "coalesce_window must be at most {MAX_COALESCE_WINDOW:?} (it delays broadcasts under load), got {:?}",
                self.coalesce_window
            ));
        }
        if self.coalesce_window * 2 > self.slow_consumer_stall {
            // A held write must never look like a client that stopped reading.
            return invalid(format!(
                "coalesce_window ({:?}) must be at most half of slow_consumer_stall ({:?})",
                self.coalesce_window, self.slow_consumer_stall
            ));
        }
        if self.idle_timeout.is_zero() {
            return invalid("idle_timeout must be above zero".into());
        }
        if !self.keep_alive_interval.is_zero() && self.keep_alive_interval >= self.idle_timeout {
            return invalid(format!(
                "keep_alive_interval ({:?}) must be below idle_timeout ({:?})",
                self.keep_alive_interval, self.idle_timeout
            ));
        }
        if self.cert.is_some() != self.key.is_some() {
            return invalid("--cert and --key go together".into());
        }
        if self.heartbeat_interval.is_zero() || self.heartbeat_interval * 2 > self.node_ttl {
            return invalid(format!(
                "heartbeat_interval ({:?}) must be above zero and at most half of node_ttl ({:?})",
                self.heartbeat_interval, self.node_ttl
            ));
        }
        if self.node_ttl < Duration::from_millis(100) {
            return invalid("node_ttl must be at least 100ms".into());
        }
        self.validate_channels()?;
        self.validate_sessions()?;
        self.validate_redis()?;
        if self.redis_prefix.is_empty() || self.redis_prefix.contains(char::is_whitespace) {
            return invalid("redis_prefix must be non-empty without spaces".into());
        }
        if self.bus_queue_len == 0 || self.delivery_timeout.is_zero() {
            return invalid("bus_queue_len and delivery_timeout must be above zero".into());
        }
        if self.name.is_empty() {
            return invalid("name must not be empty".into());
        }
        if self.max_name_bytes == 0 || self.max_name_bytes > 1024 {
            return invalid(format!(
                "max_name_bytes must be 1..=1024, got {}",
                self.max_name_bytes
            ));
        }
        if self.max_handshake_bytes < 256 {
            return invalid(format!(
                "max_handshake_bytes must be at least 256, got {}",
                self.max_handshake_bytes
            ));
        }
        // A ClientList must fit in one frame, or the request goes unanswered.
        let entry_bytes =
            16 + 16 + 8 + self.max_name_bytes + 1 + 8 + crate::protocol::MAX_USER_BYTES + 8;
        if self.max_list_clients == 0
            || self.max_list_clients.saturating_mul(entry_bytes) > HARD_MAX_FRAME_BYTES - 1024
        {
            return invalid(format!(
                "max_list_clients must be 1..={} with max_name_bytes {} (a client list must fit in one 16 MiB frame), got {}",
                (HARD_MAX_FRAME_BYTES - 1024) / entry_bytes,
                self.max_name_bytes,
                self.max_list_clients
            ));
        }
        if self.max_total_queued_bytes < self.max_queued_bytes {
            return invalid(format!(
                "max_total_queued_bytes ({}) must be at least max_queued_bytes ({})",
                self.max_total_queued_bytes, self.max_queued_bytes
            ));
        }
        if self.rate_limit_messages > 0 && self.rate_limit_burst < self.rate_limit_messages.min(1) {
            return invalid("rate_limit_burst must be at least 1".into());
        }
        if self.rate_limit_strike_window.is_zero() {
            return invalid("rate_limit_strike_window must be above zero".into());
        }
        let key_sources = [
            self.auth_jwt_secret.is_some(),
            self.auth_jwt_public_key.is_some(),
            self.auth_jwks.is_some(),
        ];
        if key_sources.iter().filter(|on| **on).count() > 1 {
            return invalid(
                "choose one of --auth-jwt-secret, --auth-jwt-public-key and --auth-jwks".into(),
            );
        }
        crate::web::validate(self).map_err(ConfigError::Invalid)?;
        if let Some(admin) = self.admin_listen
            && !admin.ip().is_loopback()
            && self.admin_token.is_none()
        {
            return invalid(format!(
                "the admin API on {admin} is reachable beyond this host: set --admin-token"
            ));
        }
        if self.admin_token.as_ref().is_some_and(|t| t.len() < 16) {
            return invalid("admin_token must be at least 16 characters".into());
        }
        if let Some(secret) = &self.auth_jwt_secret
            && secret.len() < MIN_SECRET_BYTES
        {
            return invalid(format!(
                "the JWT secret must be at least {} bytes (256 bits)",
                MIN_SECRET_BYTES
            ));
        }
        Ok(())
    }
}

/// The first setting the file writes outside its section (typically a key
/// of a file written before settings had sections): the key as written and
/// the section it belongs to (`None`: the top level). Keys that are no
/// setting at all are left to serde, whose error lists the valid ones.
fn misplaced_key(table: &toml::Table) -> Option<(String, Option<&'static str>)> {
    let home = |key: &str| SETTINGS.iter().find(|s| s.name == key).map(|s| s.section);
    for (key, value) in table {
        if SECTIONS.contains(&key.as_str()) {
            let toml::Value::Table(section) = value else {
                continue;
            };
            for inner in section.keys() {
                if let Some(home) = home(inner)
                    && home != Some(key.as_str())
                {
                    return Some((format!("{key}.{inner}"), home));
                }
            }
        } else if let Some(home @ Some(_)) = home(key) {
            return Some((key.clone(), home));
        }
    }
    None
}

/// Parses the value of `var`, the old name of setting `name`'s environment
/// variable, exactly as the setting's flag would parse it.
fn parse_legacy_env(
    var: &'static str,
    name: &'static str,
    value: OsString,
) -> Result<NodeArgs, ConfigError> {
    let setting = SETTINGS.iter().find(|s| s.name == name);
    let env = setting.map_or("", |s| s.env);
    let flag = setting.map_or_else(String::new, Setting::flag);
    // Without the environment: only the one flag counts.
    let command = NodeArgs::augment_args(clap::Command::new("fabric-node"))
        .mut_args(|arg| arg.env(None::<&'static str>));
    command
        .try_get_matches_from([OsString::from("fabric-node"), flag.into(), value])
        .and_then(|matches| NodeArgs::from_arg_matches(&matches))
        .map_err(|err| ConfigError::LegacyEnv {
            var,
            env,
            message: err
                .to_string()
                .lines()
                .next()
                .unwrap_or_default()
                .trim_start_matches("error: ")
                .to_owned(),
        })
}

impl NodeArgs {
    /// Builds the config: defaults, then the `--config` file, then the
    /// environment and the flags (which clap has already merged, flags
    /// winning; a variable under its old name counts only when neither the
    /// new one nor the flag is set). Validated.
    pub fn into_config(self) -> Result<NodeConfig, ConfigError> {
        let config = self.layered()?;
        config.validate()?;
        Ok(config)
    }

    /// The layers of [`into_config`](Self::into_config), not yet validated.
    fn layered(self) -> Result<NodeConfig, ConfigError> {
        let mut config = match &self.config {
            Some(path) => NodeConfig::from_file(path)?,
            None => NodeConfig::default(),
        };
        self.with_legacy_env()?.overlay(&mut config);
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        node: NodeArgs,
    }

    fn setting(name: &str) -> &'static Setting {
        SETTINGS
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no setting {name}"))
    }

    /// A valid value other than the default for every setting, written as
    /// [`NodeConfig::show`] writes it.
    fn sample(name: &str) -> &'static str {
        match name {
            "listen" => "127.0.0.1:4999",
            "name" => "sample-node",
            "node_id" => "6f1c4c2e-0d5b-4a57-9a4e-3c7c1b2a9d10",
            "certs_dir" => "/tmp/sample-certs",
            "cert" => "/tmp/sample.pem",
            "key" => "/tmp/sample.key",
            "cert_names" => "a.example,10.0.0.1",
            "idle_timeout" => "45s",
            "keep_alive_interval" => "3s",
            "max_streams_per_connection" => "5",
            "stream_receive_window" => "65536",
            "connection_receive_window" => "131072",
            "send_window" => "262144",
            "congestion_controller" => "cubic",
            "coalesce_window" => "5ms",
            "max_clients" => "7",
            "max_pending_handshakes" => "11",
            "address_validation" => "always",
            "handshake_timeout" => "4s",
            "max_connections_per_ip" => "13",
            "connection_rate_per_ip" => "17",
            "connection_burst_per_ip" => "19",
            "max_message_bytes" => "4096",
            "max_name_bytes" => "32",
            "max_handshake_bytes" => "2048",
            "max_list_clients" => "23",
            "outbound_queue_len" => "29",
            "max_queued_bytes" => "65536",
            "max_total_queued_bytes" => "1048576",
            "slow_consumer_stall" => "750ms",
            "rate_limit_messages" => "31",
            "rate_limit_burst" => "37",
            "rate_limit_strikes" => "41",
            "rate_limit_strike_window" => "1m",
            "rate_limit_anonymous_by_ip" => "false",
            "redis_url" => "redis://127.0.0.1:6390",
            "redis_ca" => "/tmp/redis-ca.pem",
            "redis_sentinel" => "redis://127.0.0.1:26390,redis://127.0.0.1:26391",
            "redis_sentinel_master" => "sample-master",
            "redis_cluster" => "redis://127.0.0.1:7390,redis://127.0.0.1:7391",
            "redis_prefix" => "sample",
            "redis_connect_timeout" => "2s",
            "redis_response_timeout" => "3s",
            "node_ttl" => "20s",
            "heartbeat_interval" => "4s",
            "delivery_timeout" => "6s",
            "bus_queue_len" => "43",
            "auth_jwt_secret" => "0123456789abcdef0123456789abcdef",
            "auth_jwt_public_key" => "/tmp/jwt.pem",
            "auth_jwks" => "/tmp/jwks.json",
            "auth_audience" => "aud-1,aud-2",
            "auth_issuer" => "iss-1",
            "auth_leeway" => "5s",
            "auth_client_ca" => "/tmp/client-ca.pem",
            "metrics_listen" => "127.0.0.1:9390",
            "admin_listen" => "127.0.0.1:9391",
            "webtransport" => "false",
            "webtransport_path" => "/wt",
            "webtransport_dev_cert" => "true",
            "web_origins" => "https://a.example,http://b.example:8080",
            "web_listen" => "127.0.0.1:8080",
            "webtransport_url" => "https://lb.example:4433/wt",
            "admin_token" => "sample-admin-token-0123",
            "shutdown_grace" => "9s",
            "drain_linger" => "8s",
            "max_subscriptions" => "47",
            "max_presence_members" => "53",
            "channel_subscribe" => "authenticated",
            "channel_publish" => "subscribers",
            "channel_presence" => "false",
            "channel_join_leave" => "false",
            "history_size" => "500",
            "history_ttl" => "10m",
            "history_meta_ttl" => "2h",
            "max_history_page" => "50",
            "dedupe_window" => "5m",
            "session_resume_window" => "30s",
            "session_secret" => "session-secret-0123456789abcdef0123",
            "session_secret_old" => "old-session-secret-0123456789abcdef",
            "session_inbox_len" => "59",
            "session_inbox_bytes" => "4096",
            "session_token_lifetime" => "2h",
            "namespaces" => {
                "vip,subscribe=granted,publish=nobody,presence=off,join_leave=on,history_size=0,history_ttl=0s;news,subscribe=anyone,publish=subscribers,presence=on,join_leave=off,history_size=100,history_ttl=1h"
            }
            other => panic!("no sample value for setting {other}: add one"),
        }
    }

    /// Every setting set to its sample, as `(name, value)`.
    fn all_samples() -> Vec<(&'static str, &'static str)> {
        SETTINGS.iter().map(|s| (s.name, sample(s.name))).collect()
    }

    fn assert_values(config: &NodeConfig, expected: &[(&str, &str)]) {
        for (name, value) in expected {
            assert_eq!(config.show(name).as_deref(), Some(*value), "setting {name}");
        }
    }

    /// Runs [`child_layers`] in a fresh process of this test binary, whose
    /// `FABRIC_*` environment is `vars` only, with `args` as flags, and
    /// expects the settings of `expected`. (The environment is the whole
    /// process's: setting it here would race the other tests.)
    fn in_child(vars: &[(&str, &str)], args: &[&str], expected: &[(&str, &str)]) {
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "config::tests::child_layers", "--ignored"])
            .args(["--nocapture", "--test-threads", "1"]);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with(ENV_PREFIX) {
                cmd.env_remove(key);
            }
        }
        cmd.envs(vars.iter().copied())
            .env("CONFIG_TEST_ARGS", args.join("\n"))
            .env(
                "CONFIG_TEST_EXPECTED",
                expected
                    .iter()
                    .map(|(name, value)| format!("{name}={value}"))
                    .collect::<Vec<_>>()
                    .join("\n"),
            );
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "child failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    #[ignore = "run by in_child, in a process with its own environment"]
    fn child_layers() {
        let Ok(args) = std::env::var("CONFIG_TEST_ARGS") else {
            return;
        };
        let args = args.lines().filter(|a| !a.is_empty());
        let cli = Cli::try_parse_from(std::iter::once("x").chain(args)).unwrap();
        let config = cli.node.layered().unwrap();
        let expected = std::env::var("CONFIG_TEST_EXPECTED").unwrap();
        let expected: Vec<_> = expected
            .lines()
            .map(|line| line.split_once('=').unwrap())
            .collect();
        assert_values(&config, &expected);
    }

    #[test]
    fn defaults_are_valid() {
        NodeConfig::default().validate().unwrap();
    }

    #[test]
    fn every_setting_is_named_after_its_field_with_a_sample_other_than_its_default() {
        let defaults = NodeConfig::default();
        for s in SETTINGS {
            let upper = s.name.to_uppercase();
            assert_eq!(s.env, format!("FABRIC_{upper}"));
            assert!(s.section.is_none() || SECTIONS.contains(&s.section.unwrap()));
            assert!(!s.doc.trim().is_empty(), "{} is undocumented", s.name);
            assert_ne!(defaults.show(s.name).unwrap(), sample(s.name), "{}", s.name);
        }
        let mut names: Vec<_> = SETTINGS.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), SETTINGS.len());
    }

    #[test]
    fn help_lists_every_flag_with_its_env_and_default() {
        let command = Cli::command();
        let flags = command
            .get_arguments()
            .filter(|arg| arg.get_id() != "config")
            .count();
        assert_eq!(flags, SETTINGS.len(), "a flag that is no setting");
        let help = Cli::command().render_long_help().to_string();
        let defaults = NodeConfig::default();
        for s in SETTINGS {
            let arg = command
                .get_arguments()
                .find(|arg| arg.get_id() == s.name)
                .unwrap();
            assert_eq!(arg.get_long(), Some(&s.flag()[2..]));
            assert_eq!(arg.get_env(), Some(std::ffi::OsStr::new(s.env)));
            let default = format!("[default: {}]", defaults.show(s.name).unwrap());
            let entry = help
                .split(&format!("{} <", s.flag()))
                .nth(1)
                .unwrap_or_else(|| panic!("{} not in --help", s.flag()));
            let entry = entry.split("\n  -").next().unwrap();
            assert!(entry.contains(&default), "{}: {entry}", s.name);
            assert!(entry.contains(&format!("[env: {}", s.env)), "{entry}");
        }
    }

    #[test]
    fn every_flag_sets_its_setting() {
        for s in SETTINGS {
            let mut args = vec!["x".to_owned(), s.flag(), sample(s.name).to_owned()];
            // --cert and --key go together.
            for (this, other) in [("cert", "key"), ("key", "cert")] {
                if s.name == this {
                    args.extend([setting(other).flag(), sample(other).to_owned()]);
                }
            }
            let config = Cli::try_parse_from(&args).unwrap().node.layered().unwrap();
            assert_values(&config, &[(s.name, sample(s.name))]);
        }
    }

    #[test]
    fn every_environment_variable_sets_its_setting() {
        let samples = all_samples();
        let vars: Vec<_> = samples
            .iter()
            .map(|(name, value)| (setting(name).env, *value))
            .collect();
        in_child(&vars, &[], &samples);
    }

    #[test]
    fn every_setting_has_its_key_in_its_section_of_the_file() {
        let lists = [
            "cert_names",
            "auth_audience",
            "auth_issuer",
            "web_origins",
            "redis_sentinel",
            "redis_cluster",
        ];
        let value = |s: &Setting| {
            let sample = sample(s.name);
            if lists.contains(&s.name) {
                toml::Value::Array(sample.split(',').map(toml::Value::from).collect())
            } else if s.name == "namespaces" {
                // An array of tables: `[[channels.namespaces]]`.
                let table = |spec: &str| {
                    let ns: Namespace = spec.parse().unwrap();
                    let mut t = toml::Table::new();
                    t.insert("name".into(), ns.name.into());
                    t.insert("subscribe".into(), show_enum(&ns.subscribe).into());
                    t.insert("publish".into(), show_enum(&ns.publish).into());
                    t.insert("presence".into(), ns.presence.into());
                    t.insert("join_leave".into(), ns.join_leave.into());
                    t.insert("history_size".into(), i64::from(ns.history_size).into());
                    t.insert(
                        "history_ttl".into(),
                        humantime::format_duration(ns.history_ttl)
                            .to_string()
                            .into(),
                    );
                    toml::Value::Table(t)
                };
                toml::Value::Array(sample.split(';').map(table).collect())
            } else if let Ok(number) = sample.parse::<i64>() {
                toml::Value::from(number)
            } else if let Ok(on) = sample.parse::<bool>() {
                toml::Value::from(on)
            } else {
                toml::Value::from(sample)
            }
        };
        let mut file = toml::Table::new();
        for s in SETTINGS {
            let table = match s.section {
                Some(section) => file
                    .entry(section)
                    .or_insert_with(|| toml::Table::new().into())
                    .as_table_mut()
                    .unwrap(),
                None => &mut file,
            };
            table.insert(s.name.into(), value(s));
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, toml::to_string(&file).unwrap()).unwrap();
        assert_values(&NodeConfig::from_file(&path).unwrap(), &all_samples());
    }

    #[test]
    fn a_sectioned_file_sets_settings_in_several_sections() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            r#"
name = "from-file"
node_id = "6f1c4c2e-0d5b-4a57-9a4e-3c7c1b2a9d10"

[tls]
cert_names = ["a.example", "10.0.0.1"]

[transport]
idle_timeout = "45s"

[limits]
max_clients = 7
address_validation = "always"

[cluster]
redis_url = "redis://127.0.0.1:6390"

[auth]
auth_audience = ["aud-1", "aud-2"]

[operations]
metrics_listen = "127.0.0.1:9390"
"#,
        )
        .unwrap();
        let config = NodeConfig::from_file(&path).unwrap();
        assert_values(
            &config,
            &[
                ("name", "from-file"),
                ("node_id", sample("node_id")),
                ("cert_names", sample("cert_names")),
                ("idle_timeout", "45s"),
                ("max_clients", "7"),
                ("address_validation", "always"),
                ("redis_url", sample("redis_url")),
                ("auth_audience", sample("auth_audience")),
                ("metrics_listen", sample("metrics_listen")),
            ],
        );
        assert_eq!(config.listen, NodeConfig::default().listen);
        config.validate().unwrap();
    }

    #[test]
    fn flags_override_file_and_file_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            "name = \"from-file\"\n[limits]\nmax_clients = 7\n[transport]\nidle_timeout = \"45s\"\n",
        )
        .unwrap();
        let cli = Cli::parse_from([
            "x",
            "--config",
            path.to_str().unwrap(),
            "--max-clients",
            "9",
        ]);
        let config = cli.node.into_config().unwrap();
        assert_eq!(config.name, "from-file");
        assert_eq!(config.max_clients, 9);
        assert_eq!(config.idle_timeout, Duration::from_secs(45));
        assert_eq!(config.listen, NodeConfig::default().listen);
    }

    #[test]
    fn environment_overrides_file_and_flags_override_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            "name = \"from-file\"\n[limits]\nmax_clients = 7\n[transport]\nidle_timeout = \"45s\"\n",
        )
        .unwrap();
        in_child(
            &[
                ("FABRIC_CONFIG", path.to_str().unwrap()),
                ("FABRIC_MAX_CLIENTS", "8"),
                ("FABRIC_IDLE_TIMEOUT", "50s"),
            ],
            &["--max-clients", "9"],
            &[
                ("name", "from-file"),
                ("idle_timeout", "50s"),
                ("max_clients", "9"),
                ("listen", "0.0.0.0:4433"),
            ],
        );
    }

    #[test]
    fn old_flags_are_aliases() {
        let cli = Cli::parse_from([
            "x",
            "--certs",
            "/tmp/old-certs",
            "--redis",
            "redis://127.0.0.1:6390",
            "--metrics",
            "127.0.0.1:9390",
            "--admin",
            "127.0.0.1:9391",
            "--rate-limit",
            "31",
        ]);
        assert_values(
            &cli.node.layered().unwrap(),
            &[
                ("certs_dir", "/tmp/old-certs"),
                ("redis_url", "redis://127.0.0.1:6390"),
                ("metrics_listen", "127.0.0.1:9390"),
                ("admin_listen", "127.0.0.1:9391"),
                ("rate_limit_messages", "31"),
            ],
        );
    }

    #[test]
    fn old_environment_variables_still_count_unless_the_new_name_or_flag_is_set() {
        let legacy: Vec<_> = SETTINGS
            .iter()
            .filter_map(|s| Some((s.legacy_env?, s.name)))
            .collect();
        assert_eq!(legacy.len(), 6, "{legacy:?}");
        let mut vars: Vec<_> = legacy
            .iter()
            .map(|(var, name)| (*var, sample(name)))
            .collect();
        let mut expected: Vec<_> = legacy
            .iter()
            .map(|(_, name)| (*name, sample(name)))
            .collect();
        // The new name wins over the old one, and a flag over both.
        vars.push(("FABRIC_MAX_STREAMS_PER_CONNECTION", "6"));
        expected.retain(|(name, _)| {
            !["max_streams_per_connection", "keep_alive_interval"].contains(name)
        });
        expected.extend([
            ("max_streams_per_connection", "6"),
            ("keep_alive_interval", "2s"),
        ]);
        in_child(&vars, &["--keep-alive-interval", "2s"], &expected);
    }

    #[test]
    fn a_bad_value_under_an_old_environment_name_is_an_error_naming_it() {
        let err = parse_legacy_env("FABRIC_KEEP_ALIVE", "keep_alive_interval", "soon".into())
            .unwrap_err()
            .to_string();
        assert!(err.contains("FABRIC_KEEP_ALIVE "), "{err}");
        assert!(err.contains("FABRIC_KEEP_ALIVE_INTERVAL"), "{err}");
        assert!(err.contains("soon"), "{err}");
    }

    #[test]
    fn a_setting_outside_its_section_is_an_error_naming_the_section() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        for (text, key, place) in [
            // A file from before sections.
            ("max_clients = 7\n", "`max_clients`", "[limits]"),
            (
                "[tls]\nredis_url = \"redis://r\"\n",
                "`tls.redis_url`",
                "[cluster]",
            ),
            (
                "[limits]\nlisten = \"127.0.0.1:1\"\n",
                "`limits.listen`",
                "top level",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = NodeConfig::from_file(&path).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(place), "{err}");
        }
    }

    #[test]
    fn unknown_file_keys_and_bad_values_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        for text in ["max_clientz = 7\n", "[limits]\nmax_clientz = 7\n"] {
            std::fs::write(&path, text).unwrap();
            let err = NodeConfig::from_file(&path).unwrap_err();
            assert!(err.to_string().contains("max_clientz"), "{err}");
        }

        let config = NodeConfig {
            max_list_clients: 100_000,
            ..Default::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("1..=44499"),
            "a list must fit one frame: {err}"
        );

        let config = NodeConfig {
            coalesce_window: Duration::from_secs(2),
            ..Default::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("coalesce_window must be at most 1s"), "{err}");
        let config = NodeConfig {
            coalesce_window: Duration::from_millis(500),
            slow_consumer_stall: Duration::from_millis(750),
            ..Default::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("at most half of slow_consumer_stall"), "{err}");

        let config = NodeConfig {
            max_streams_per_connection: 2,
            ..Default::default()
        };
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("at least 3")
        );
    }

    #[test]
    fn the_bus_has_one_redis_target_a_url_sentinels_with_a_master_name_or_a_cluster() {
        use crate::bus::master::RedisTarget;
        let sentinels = vec!["redis://s1:26379".to_owned(), "redis://s2:26379".to_owned()];
        let refused = |config: NodeConfig, why: &str| {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        };
        refused(
            NodeConfig {
                redis_url: Some("redis://r".into()),
                redis_sentinel: sentinels.clone(),
                redis_sentinel_master: Some("m".into()),
                ..Default::default()
            },
            "exclude each other",
        );
        refused(
            NodeConfig {
                redis_sentinel: sentinels.clone(),
                ..Default::default()
            },
            "needs redis_sentinel_master",
        );
        refused(
            NodeConfig {
                redis_sentinel_master: Some("m".into()),
                ..Default::default()
            },
            "needs redis_sentinel",
        );
        // An empty URL (an override clearing FABRIC_REDIS_URL) is none.
        let config = NodeConfig {
            redis_url: Some(String::new()),
            redis_sentinel: sentinels.clone(),
            redis_sentinel_master: Some("m".into()),
            ..Default::default()
        };
        config.validate().unwrap();
        assert_eq!(
            config.redis_target(),
            Some(RedisTarget::Sentinel {
                sentinels,
                master: "m".into()
            })
        );
        assert_eq!(NodeConfig::default().redis_target(), None);
        let config = NodeConfig {
            redis_url: Some("redis://r:6379".into()),
            ..Default::default()
        };
        assert_eq!(
            config.redis_target(),
            Some(RedisTarget::Url("redis://r:6379".into()))
        );
        let seeds = vec!["redis://c1:7000".to_owned(), "redis://c2:7001".to_owned()];
        refused(
            NodeConfig {
                redis_url: Some("redis://r".into()),
                redis_cluster: seeds.clone(),
                ..Default::default()
            },
            "redis_cluster excludes",
        );
        refused(
            NodeConfig {
                redis_cluster: seeds.clone(),
                redis_sentinel: vec!["redis://s1:26379".to_owned()],
                redis_sentinel_master: Some("m".into()),
                ..Default::default()
            },
            "redis_cluster excludes",
        );
        let config = NodeConfig {
            redis_url: Some(String::new()),
            redis_cluster: seeds.clone(),
            ..Default::default()
        };
        config.validate().unwrap();
        assert_eq!(config.redis_target(), Some(RedisTarget::Cluster { seeds }));
    }

    /// Checks that `doc` has one table row per setting of `settings`,
    /// starting with its key, flag (and every alias), environment variable
    /// (and old name) and default, so that the docs cannot drift from the
    /// code.
    fn check_settings_table(doc: &str, file: &str, settings: &[&Setting]) {
        let command = Cli::command();
        let defaults = NodeConfig::default();
        for s in settings {
            let start = format!("| `{}` |", s.key());
            let rows: Vec<_> = doc.lines().filter(|l| l.starts_with(&start)).collect();
            assert_eq!(rows.len(), 1, "{file}: one row for `{}`", s.key());
            let cells: Vec<_> = rows[0].split('|').map(str::trim).collect();
            let first = |cell: &str| cell.split('`').nth(1).unwrap_or_default().to_owned();
            assert_eq!(first(cells[2]), s.flag(), "{file}: flag of {}", s.key());
            let arg = command
                .get_arguments()
                .find(|arg| arg.get_id() == s.name)
                .unwrap();
            for alias in arg.get_all_aliases().unwrap_or_default() {
                assert!(
                    cells[2].contains(&format!("`--{alias}`")),
                    "{file}: alias --{alias} of {}",
                    s.key()
                );
            }
            assert_eq!(first(cells[3]), s.env, "{file}: variable of {}", s.key());
            if let Some(old) = s.legacy_env {
                assert!(cells[3].contains(&format!("`{old}`")), "{file}: {old}");
            }
            assert_eq!(
                cells[4].replace('`', ""),
                defaults.show(s.name).unwrap(),
                "{file}: default of {}",
                s.key()
            );
        }
    }

    fn read_doc(file: &str) -> String {
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).unwrap()
    }

    #[test]
    fn the_readme_table_lists_every_setting_as_the_code_has_it() {
        let settings: Vec<_> = SETTINGS.iter().collect();
        check_settings_table(&read_doc("README.md"), "README.md", &settings);
    }

    #[test]
    fn the_cluster_table_lists_every_cluster_setting_as_the_code_has_it() {
        let settings: Vec<_> = SETTINGS
            .iter()
            .filter(|s| s.section == Some("cluster") || s.name == "node_id")
            .collect();
        check_settings_table(&read_doc("CLUSTER.md"), "CLUSTER.md", &settings);
    }
}
