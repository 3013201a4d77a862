//! Browsers: the WebTransport door on the QUIC port, and the `--web`
//! listener that serves the demo chat page, the JavaScript client and the
//! discovery endpoint (`GET /webtransport.json`: the URL to connect to and,
//! with dev certificates, the certificate hashes a page needs).
//!
//! A WebTransport session is an HTTP/3 extended CONNECT on a QUIC
//! connection with ALPN `h3`. Once the node accepted it, the session
//! carries exactly the frames of a native connection (PROTOCOL.md section
//! 12), so everything after [`WebDoor::accept`] is the native code path.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use quinn::VarInt;
use serde_json::json;
use tracing::debug;
use web_transport_quinn as wt;

use crate::config::NodeConfig;
use crate::connection::CloseReason;
use crate::node::Node;
use crate::protocol::{self, close_code};
use crate::stats::RefusedReason;
use crate::tls::WebCert;

/// Streams an HTTP/3 client keeps open besides its WebTransport streams:
/// control, QPACK encoder, QPACK decoder.
const H3_UNI_STREAMS: u32 = 3;

/// Which web origins may open WebTransport sessions and read the
/// discovery endpoint (`web_origins`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origins {
    /// Pages served from loopback only (the default).
    Loopback,
    /// Any origin (`*`).
    Any,
    /// These origins, normalised (`scheme://host[:port]`, lower case).
    List(Vec<String>),
}

impl Origins {
    /// Parses the `web_origins` setting.
    pub fn parse(list: &[String]) -> Result<Origins, String> {
        if list.is_empty() {
            return Ok(Origins::Loopback);
        }
        if list.iter().any(|o| o.trim() == "*") {
            return Ok(Origins::Any);
        }
        list.iter()
            .map(|origin| {
                let normal = normal_origin(origin);
                split_origin(&normal)
                    .map(|_| normal.clone())
                    .ok_or_else(|| {
                        format!(
                            "web_origins: {origin:?} is not an origin like https://example.com:8443"
                        )
                    })
            })
            .collect::<Result<_, _>>()
            .map(Origins::List)
    }

    /// Whether a page of `origin` may connect. A request without an
    /// `Origin` header does not come from a web page (browsers always send
    /// one with WebTransport): it is allowed, since any non-browser client
    /// could claim any origin anyway; tokens are what authenticate.
    pub fn allows(&self, origin: Option<&str>) -> bool {
        let Some(origin) = origin else { return true };
        let origin = normal_origin(origin);
        match self {
            Origins::Any => true,
            Origins::List(list) => list.contains(&origin),
            Origins::Loopback => split_origin(&origin)
                .is_some_and(|(_, host)| matches!(host, "localhost" | "127.0.0.1" | "[::1]")),
        }
    }
}

/// `origin` as browsers send it: lower case, no trailing `/`, no default
/// port (`https://x:443` is `https://x`).
fn normal_origin(origin: &str) -> String {
    let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
    for (scheme, port) in [("https://", ":443"), ("http://", ":80")] {
        if origin.starts_with(scheme)
            && let Some(bare) = origin.strip_suffix(port)
        {
            return bare.to_owned();
        }
    }
    origin
}

/// `scheme://host[:port]` split into scheme and host (without the port),
/// if `origin` has that form with scheme http or https.
fn split_origin(origin: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = origin.split_once("://")?;
    if !matches!(scheme, "http" | "https") || rest.is_empty() || rest.contains(['/', '?', '#', '@'])
    {
        return None;
    }
    let host = if rest.starts_with('[') {
        // An IPv6 literal, then an optional port.
        let end = rest.find(']')?;
        let (host, port) = rest.split_at(end + 1);
        valid_port(port)?;
        host
    } else {
        match rest.rsplit_once(':') {
            Some((host, port)) => {
                valid_port(&format!(":{port}"))?;
                host
            }
            None => rest,
        }
    };
    (!host.is_empty()).then_some((scheme, host))
}

fn valid_port(port: &str) -> Option<()> {
    match port.strip_prefix(':') {
        None if port.is_empty() => Some(()),
        Some(digits) => digits.parse::<u16>().ok().map(|_| ()),
        None => None,
    }
}

/// Checks the `[web]` settings (called by `NodeConfig::validate`).
pub fn validate(config: &NodeConfig) -> Result<(), String> {
    let path = &config.webtransport_path;
    if !path.starts_with('/') || path.len() > 256 || path.contains(['?', '#', ' ']) {
        return Err(format!(
            "webtransport_path {path:?} must start with / and hold no query, fragment or space"
        ));
    }
    Origins::parse(&config.web_origins)?;
    if let Some(url) = &config.webtransport_url
        && !url.starts_with("https://")
    {
        return Err(format!(
            "webtransport_url {url:?} must be an https:// URL (WebTransport runs on HTTP/3)"
        ));
    }
    Ok(())
}

/// The WebTransport door of a node and its discovery endpoint.
#[derive(Debug)]
pub struct WebDoor {
    path: String,
    origins: Origins,
    cert: Arc<WebCert>,
    url: Option<String>,
    /// The QUIC socket's address (its port, and its IP family for
    /// `localhost`).
    quic_addr: SocketAddr,
    handshake_timeout: Duration,
    uni_streams: u32,
}

impl WebDoor {
    /// The door for `config`, serving `cert`, on the QUIC socket bound to
    /// `quic_addr`.
    pub fn new(
        config: &NodeConfig,
        cert: Arc<WebCert>,
        quic_addr: SocketAddr,
    ) -> Result<Self, String> {
        Ok(WebDoor {
            path: config.webtransport_path.clone(),
            origins: Origins::parse(&config.web_origins)?,
            cert,
            url: config.webtransport_url.clone(),
            quic_addr,
            handshake_timeout: config.handshake_timeout,
            uni_streams: config.max_streams_per_connection,
        })
    }

    /// The certificate browsers get.
    pub fn cert(&self) -> &Arc<WebCert> {
        &self.cert
    }

    /// Turns a QUIC connection with ALPN `h3` into a WebTransport session:
    /// HTTP/3 settings and the CONNECT request within `handshake_timeout`,
    /// the path and the page's origin checked. A refusal is answered with
    /// an HTTP status (404, 403) before the connection closes.
    pub(crate) async fn accept(
        &self,
        conn: quinn::Connection,
        node: &Node,
    ) -> Result<wt::Session, CloseReason> {
        // The handshake advertised what native clients may open (no
        // bidirectional stream); HTTP/3 needs one bidirectional stream for
        // the CONNECT and three unidirectional ones of its own. Browsers
        // wait for this credit.
        conn.set_max_concurrent_bi_streams(VarInt::from_u32(1));
        conn.set_max_concurrent_uni_streams(VarInt::from_u32(H3_UNI_STREAMS + self.uni_streams));
        let refused = |reason, close: CloseReason| {
            node.stats().refused(reason);
            debug!(reason = %close.reason, "WebTransport request refused");
            close
        };
        // One deadline for the CONNECT request and the answer to it (a
        // client that grants no credit for the answer must not hold its
        // pending-handshake slot).
        let deadline = tokio::time::Instant::now() + self.handshake_timeout;
        let timed_out = || {
            refused(
                RefusedReason::HandshakeTimeout,
                CloseReason::new(
                    close_code::HANDSHAKE_TIMEOUT,
                    "no WebTransport session request in time",
                ),
            )
        };
        let request =
            match tokio::time::timeout_at(deadline, wt::Request::accept(conn.clone())).await {
                Ok(Ok(request)) => request,
                Ok(Err(err)) => {
                    return Err(refused(
                        RefusedReason::WebTransportRequest,
                        CloseReason::new(
                            close_code::PROTOCOL_VIOLATION,
                            format!("no WebTransport session: {err}"),
                        ),
                    ));
                }
                Err(_) => return Err(timed_out()),
            };
        let path = request.url.path().to_owned();
        let origin = request
            .headers
            .get("origin")
            .map(|o| o.to_str().unwrap_or("(not text)").to_owned());
        let refusal = if path != self.path {
            Some((
                wt::http::StatusCode::NOT_FOUND,
                format!(
                    "no WebTransport endpoint at {path} (it is at {})",
                    self.path
                ),
            ))
        } else if !self.origins.allows(origin.as_deref()) {
            Some((
                wt::http::StatusCode::FORBIDDEN,
                format!(
                    "origin {} may not connect (web_origins)",
                    origin.unwrap_or_default()
                ),
            ))
        } else {
            None
        };
        if let Some((status, why)) = refusal {
            let close = refused(
                RefusedReason::WebTransportRequest,
                CloseReason::new(close_code::NORMAL, why),
            );
            reject(request, &conn, status).await;
            return Err(close);
        }
        match tokio::time::timeout_at(deadline, request.ok()).await {
            Ok(Ok(session)) => Ok(session),
            Ok(Err(err)) => Err(refused(
                RefusedReason::WebTransportRequest,
                CloseReason::new(
                    close_code::NORMAL,
                    format!("WebTransport session not established: {err}"),
                ),
            )),
            Err(_) => Err(timed_out()),
        }
    }

    /// The `--web` listener's routes: the demo page, the JavaScript client
    /// and `GET /webtransport.json`.
    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route(
                "/",
                get(|| async { page(PAGE_HTML, "text/html; charset=utf-8") }),
            )
            .route(
                "/index.html",
                get(|| async { page(PAGE_HTML, "text/html; charset=utf-8") }),
            )
            .route("/app.js", get(|| async { page(PAGE_JS, JS) }))
            .route(
                "/style.css",
                get(|| async { page(PAGE_CSS, "text/css; charset=utf-8") }),
            )
            .route("/fabric.js", get(|| async { page(CLIENT_JS, JS) }))
            .route(
                "/fabric.d.ts",
                get(|| async { page(CLIENT_TYPES, "text/plain; charset=utf-8") }),
            )
            .route("/webtransport.json", get(discovery))
            .with_state(self)
    }

    /// The URL a page loaded from `host` (the HTTP `Host` header) should
    /// connect to.
    fn url_for(&self, host: Option<&str>) -> String {
        if let Some(url) = &self.url {
            return url.clone();
        }
        let loopback = if self.quic_addr.is_ipv6() {
            "[::1]"
        } else {
            "127.0.0.1"
        };
        // `localhost` may resolve to the other family first, which a
        // socket bound to one family never answers: name the address.
        let host = match host.map(strip_port) {
            None | Some("localhost") => loopback,
            Some(host) if valid_host(host) => host,
            // Not a host name or address: nothing to advertise from it.
            Some(_) => loopback,
        };
        format!("https://{host}:{}{}", self.quic_addr.port(), self.path)
    }
}

/// Answers a session request with an HTTP error status, and gives it up
/// to a second to arrive (the client closes the connection once it has it)
/// before the connection is closed under it.
async fn reject(request: wt::Request, conn: &quinn::Connection, status: wt::http::StatusCode) {
    let answer = async {
        if request.reject(status).await.is_ok() {
            conn.closed().await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
}

const JS: &str = "text/javascript; charset=utf-8";
const PAGE_HTML: &str = include_str!("../web/index.html");
const PAGE_JS: &str = include_str!("../web/app.js");
const PAGE_CSS: &str = include_str!("../web/style.css");
const CLIENT_JS: &str = include_str!("../clients/js/fabric.js");
const CLIENT_TYPES: &str = include_str!("../clients/js/fabric.d.ts");

/// A static file with the headers every page response gets.
fn page(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            // Scripts and styles from this listener only; WebTransport to
            // any https URL (the node's QUIC port is another origin).
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; connect-src 'self' https:; img-src 'self' data:; \
                 object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
            ),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Whether `host` is a DNS name, an IPv4 address or a bracketed IPv6
/// address: what may stand in a URL's authority.
fn valid_host(host: &str) -> bool {
    match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host.len() <= 253
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        }
    }
}

/// `Host` without its port (`[::1]:8080` → `[::1]`).
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

/// `GET /webtransport.json`: where to connect, and the dev certificate's
/// hashes. Readable cross-origin by the allowed origins (CORS).
async fn discovery(State(door): State<Arc<WebDoor>>, headers: HeaderMap) -> Response {
    let origin = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok());
    if !door.origins.allows(origin) {
        return (
            StatusCode::FORBIDDEN,
            "this origin may not connect (web_origins)",
        )
            .into_response();
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let hashes: Vec<_> = door
        .cert
        .hashes()
        .iter()
        .map(|hash| {
            json!({
                "algorithm": "sha-256",
                "value": base64::engine::general_purpose::STANDARD.encode(hash),
            })
        })
        .collect();
    let body = json!({
        "url": door.url_for(host),
        "serverCertificateHashes": hashes,
        "version": protocol::MAX_PROTOCOL_VERSION,
    });
    let mut response = Json(body).into_response();
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
    if let Some(origin) = origin.and_then(|o| HeaderValue::from_str(o).ok()) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_default_allows_loopback_pages_only() {
        let o = Origins::parse(&[]).unwrap();
        assert_eq!(o, Origins::Loopback);
        for ok in [
            "http://localhost:8080",
            "http://127.0.0.1",
            "https://[::1]:9000",
            "HTTP://LOCALHOST:1",
        ] {
            assert!(o.allows(Some(ok)), "{ok}");
        }
        for bad in [
            "http://evil.example",
            "http://localhost.evil.example",
            "http://127.0.0.1.evil.example:80",
            "file://",
            "null",
            "http://localhost/path",
        ] {
            assert!(!o.allows(Some(bad)), "{bad}");
        }
        assert!(o.allows(None));
    }

    #[test]
    fn a_list_allows_exactly_its_origins() {
        let o = Origins::parse(&list(&[
            "https://Chat.Example.com/",
            "http://b.example:8080",
        ]))
        .unwrap();
        assert!(o.allows(Some("https://chat.example.com")));
        assert!(o.allows(Some("http://b.example:8080")));
        assert!(!o.allows(Some("http://chat.example.com")));
        assert!(!o.allows(Some("http://b.example:8081")));
        assert!(!o.allows(Some("http://localhost:8080")));
        // A default port names the same origin.
        let o = Origins::parse(&list(&["https://chat.example.com:443"])).unwrap();
        assert!(o.allows(Some("https://chat.example.com")));
        assert!(!o.allows(Some("http://chat.example.com")));
        assert_eq!(Origins::parse(&list(&["*"])).unwrap(), Origins::Any);
        for bad in [
            "chat.example.com",
            "ftp://x",
            "https://x/path",
            "https://x:99999",
            "https://",
        ] {
            assert!(Origins::parse(&list(&[bad])).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_advertised_url_follows_the_page_host_and_names_loopback_by_address() {
        let dir = tempfile::tempdir().unwrap();
        let cert = Arc::new(WebCert::dev(dir.path(), &["localhost".into()]).unwrap());
        let config = NodeConfig::default();
        let v4 = WebDoor::new(&config, cert.clone(), "0.0.0.0:4433".parse().unwrap()).unwrap();
        assert_eq!(
            v4.url_for(Some("localhost:8080")),
            "https://127.0.0.1:4433/fabric"
        );
        assert_eq!(v4.url_for(None), "https://127.0.0.1:4433/fabric");
        assert_eq!(
            v4.url_for(Some("chat.example.com:8080")),
            "https://chat.example.com:4433/fabric"
        );
        for hostile in ["evil/x?", "a b", "x@y", "[not-v6]", ""] {
            assert_eq!(
                v4.url_for(Some(hostile)),
                "https://127.0.0.1:4433/fabric",
                "{hostile}"
            );
        }
        assert_eq!(v4.url_for(Some("[::1]:8080")), "https://[::1]:4433/fabric");
        let v6 = WebDoor::new(&config, cert.clone(), "[::]:4433".parse().unwrap()).unwrap();
        assert_eq!(v6.url_for(Some("localhost")), "https://[::1]:4433/fabric");
        let fixed = NodeConfig {
            webtransport_url: Some("https://lb.example:443/fabric".into()),
            ..NodeConfig::default()
        };
        let lb = WebDoor::new(&fixed, cert, "0.0.0.0:4433".parse().unwrap()).unwrap();
        assert_eq!(
            lb.url_for(Some("localhost:8080")),
            "https://lb.example:443/fabric"
        );
    }

    #[test]
    fn ports_are_taken_off_hosts() {
        assert_eq!(strip_port("localhost:8080"), "localhost");
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
        assert_eq!(strip_port("example.com"), "example.com");
    }
}
