//! TLS for both ends: development certificates (a dev CA and a server
//! certificate signed by it, generated once into the certs directory and
//! reused, under a lock file so nodes sharing the directory agree), the
//! rustls configurations quinn runs on, and the QUIC endpoint keys (stateless
//! reset, connection ids) derived from the node's TLS key. TLS 1.3 only,
//! ALPN `quic-fabric/1`, ring as the crypto provider.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::protocol::ALPN;

/// Why certificates or TLS configs could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A PEM file held nothing usable.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
    /// The certs directory could not be locked, and something in it needed
    /// generating (a directory without its lock file is only usable as is).
    #[error("{path}: cannot lock to generate {what}: {source}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// What needed generating.
        what: String,
        /// Why the lock could not be had.
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// quinn refused the rustls configuration.
    #[error("quic crypto configuration: {0}")]
    Quic(String),
}

/// Paths of the dev certificate files inside a certs directory.
#[derive(Debug, Clone)]
pub struct DevCertPaths {
    /// The CA certificate clients trust.
    pub ca_cert: PathBuf,
    /// The CA private key.
    pub ca_key: PathBuf,
    /// The server certificate.
    pub server_cert: PathBuf,
    /// The server private key.
    pub server_key: PathBuf,
    /// The names `server_cert` was made for, one per line.
    pub server_names: PathBuf,
    /// Held exclusively (`File::lock`, flock on Unix) while the set is
    /// checked, generated or read, so nodes started together, or a node
    /// renewing while another starts, never see half of a generation.
    pub lock: PathBuf,
}

impl DevCertPaths {
    /// The standard file names under `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        DevCertPaths {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            server_names: dir.join("server.names"),
            lock: dir.join(".lock"),
        }
    }
}

/// A dev server certificate chain and its private key, read together under
/// the certs directory's lock: one generation, never a key from one and a
/// certificate from another.
#[derive(Debug)]
pub struct DevServerCert {
    /// Where the files are.
    pub paths: DevCertPaths,
    /// The server certificate chain.
    pub chain: Vec<CertificateDer<'static>>,
    /// The server private key.
    pub key: PrivateKeyDer<'static>,
}

/// Makes sure `dir` holds a dev CA and a server certificate valid for
/// `names`, generating what is missing: the CA once, the server certificate
/// whenever the requested names change. Files are written atomically, keys
/// with mode 0600. Safe to call from several processes at once; to serve
/// the certificate, use [`load_dev_certs`], which also reads it under the
/// lock.
pub fn ensure_dev_certs(dir: &Path, names: &[String]) -> Result<DevCertPaths, TlsError> {
    load_dev_certs(dir, names).map(|dev| dev.paths)
}

/// [`ensure_dev_certs`], returning the server chain and key as read while
/// the directory was still locked. A directory whose lock file cannot be
/// created (mounted read-only) is used without the lock as long as nothing
/// in it needs generating.
pub fn load_dev_certs(dir: &Path, names: &[String]) -> Result<DevServerCert, TlsError> {
    let certs = CertsDir::lock(dir)?;
    let paths = &certs.paths;
    certs.ensure_ca()?;
    let wanted = names.join("\n");
    let current = fs::read_to_string(&paths.server_names).unwrap_or_default();
    if current != wanted || !paths.server_cert.exists() || !paths.server_key.exists() {
        certs.writable("a server certificate")?;
        let ca_key = KeyPair::from_pem(&read_string(&paths.ca_key)?)?;
        let issuer = Issuer::from_ca_cert_pem(&read_string(&paths.ca_cert)?, ca_key)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "quic-fabric node");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &issuer)?;
        write_atomic(&paths.server_key, key.serialize_pem().as_bytes(), true)?;
        write_atomic(&paths.server_cert, cert.pem().as_bytes(), false)?;
        write_atomic(&paths.server_names, wanted.as_bytes(), false)?;
    }
    let chain = load_certs(&paths.server_cert)?;
    let key = load_key(&paths.server_key)?;
    Ok(DevServerCert {
        chain,
        key,
        paths: certs.paths,
    })
}

/// The dev session secret in `dir` (`session.key`: 32 random bytes, hex),
/// generated under the directory's lock when missing, so every node that
/// shares the directory signs resume tokens with the same secret.
pub fn load_dev_session_secret(dir: &Path) -> Result<Vec<u8>, TlsError> {
    let certs = CertsDir::lock(dir)?;
    let path = dir.join("session.key");
    if !path.exists() {
        certs.writable("the dev session secret")?;
        let mut secret = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret).map_err(
            |_| TlsError::Pem {
                path: path.clone(),
                what: "no random bytes for the session secret".into(),
            },
        )?;
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        write_atomic(&path, hex.as_bytes(), true)?;
    }
    let hex = read_string(&path)?;
    let hex = hex.trim();
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    match bytes {
        Some(bytes) if bytes.len() >= crate::session::MIN_SECRET_BYTES => Ok(bytes),
        _ => Err(TlsError::Pem {
            path,
            what: "not a session secret (64 or more hex digits)".into(),
        }),
    }
}

/// Issues a client certificate for mutual TLS from the dev CA in `dir`
/// (created if missing), under the directory's lock: common name `name`,
/// written as `client-NAME.pem` / `client-NAME.key`. Returns the two paths.
pub fn issue_dev_client_cert(dir: &Path, name: &str) -> Result<ClientCert, TlsError> {
    let invalid = name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c));
    if invalid {
        return Err(TlsError::Pem {
            path: dir.to_owned(),
            what: format!("client name {name:?} must be 1 to 64 of [A-Za-z0-9-_.@]"),
        });
    }
    let certs = CertsDir::lock(dir)?;
    certs.writable("a client certificate")?;
    certs.ensure_ca()?;
    let paths = &certs.paths;
    let ca_key = KeyPair::from_pem(&read_string(&paths.ca_key)?)?;
    let issuer = Issuer::from_ca_cert_pem(&read_string(&paths.ca_cert)?, ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer)?;
    let identity = ClientCert {
        cert: dir.join(format!("client-{name}.pem")),
        key: dir.join(format!("client-{name}.key")),
    };
    write_atomic(&identity.key, key.serialize_pem().as_bytes(), true)?;
    write_atomic(&identity.cert, cert.pem().as_bytes(), false)?;
    Ok(identity)
}

/// A certs directory, locked for as long as this value lives (dropping the
/// file releases the lock), or known to be unlockable.
struct CertsDir {
    paths: DevCertPaths,
    /// The locked file, or why it could not be opened or locked.
    lock: Result<fs::File, std::io::Error>,
}

impl CertsDir {
    /// Creates `dir` if needed and waits for its lock. Only creating the
    /// directory is fatal here; a lock that cannot be had is reported by
    /// [`CertsDir::writable`] once something needs writing.
    fn lock(dir: &Path) -> Result<CertsDir, TlsError> {
        fs::create_dir_all(dir).map_err(|source| TlsError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let paths = DevCertPaths::in_dir(dir);
        let lock = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&paths.lock)
            // A lock file left in a directory since mounted read-only
            // still locks: flock needs no write access.
            .or_else(|err| fs::File::open(&paths.lock).map_err(|_| err))
            .and_then(|file| file.lock().map(|()| file));
        Ok(CertsDir { paths, lock })
    }

    /// Fails unless the lock is held, naming `what` needed writing.
    fn writable(&self, what: &str) -> Result<(), TlsError> {
        match &self.lock {
            Ok(_) => Ok(()),
            Err(err) => Err(TlsError::Lock {
                path: self.paths.lock.clone(),
                what: what.to_owned(),
                source: std::io::Error::new(err.kind(), err.to_string()),
            }),
        }
    }

    /// Generates the dev CA unless both its files exist.
    fn ensure_ca(&self) -> Result<(), TlsError> {
        let paths = &self.paths;
        if paths.ca_cert.exists() && paths.ca_key.exists() {
            return Ok(());
        }
        self.writable("the dev CA")?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "quic-fabric dev CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key)?;
        write_atomic(&paths.ca_key, key.serialize_pem().as_bytes(), true)?;
        write_atomic(&paths.ca_cert, cert.pem().as_bytes(), false)?;
        // A new CA invalidates any server certificate signed by an old one.
        let _ = fs::remove_file(&paths.server_names);
        Ok(())
    }
}

/// The user a verified client certificate names: its subject common name,
/// else its first DNS or e-mail subject alternative name.
pub fn certificate_user(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed
        .subject()
        .iter_common_name()
        .find_map(|cn| cn.as_str().ok().map(str::to_owned));
    cn.or_else(|| {
        let san = parsed.subject_alternative_name().ok()??;
        san.value.general_names.iter().find_map(|name| match name {
            GeneralName::DNSName(n) | GeneralName::RFC822Name(n) => Some((*n).to_owned()),
            _ => None,
        })
    })
}

/// The user named by the certificate a QUIC peer presented (mutual TLS).
pub fn peer_user(conn: &quinn::Connection) -> Option<String> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast_ref::<Vec<CertificateDer<'static>>>()?;
    certificate_user(chain.first()?)
}

fn read_string(path: &Path) -> Result<String, TlsError> {
    fs::read_to_string(path).map_err(|source| TlsError::Io {
        path: path.to_owned(),
        source,
    })
}

fn write_atomic(path: &Path, contents: &[u8], secret: bool) -> Result<(), TlsError> {
    let io = |source| TlsError::Io {
        path: path.to_owned(),
        source,
    };
    // Unique per process and call, so writers never share a temporary file.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(&tmp).map_err(io)?;
    file.write_all(contents).map_err(io)?;
    file.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

/// Loads a PEM certificate chain.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            what: "no certificate found".into(),
        });
    }
    Ok(certs)
}

/// Loads a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| pem_error(path, e))
}

fn pem_error(path: &Path, err: rustls::pki_types::pem::Error) -> TlsError {
    match err {
        rustls::pki_types::pem::Error::Io(source) => TlsError::Io {
            path: path.to_owned(),
            source,
        },
        other => TlsError::Pem {
            path: path.to_owned(),
            what: other.to_string(),
        },
    }
}

// HKDF labels of what `endpoint_config` derives from the TLS key. Versioned
// so the derivation can change; a new label changes the keys, as rotating
// the TLS key does.
const RESET_KEY_LABEL: &[u8] = b"quic-fabric stateless reset v1";
const CID_KEY_LABEL: &[u8] = b"quic-fabric connection id v1";

/// The QUIC endpoint config of a node that serves `key`: its stateless
/// reset key and the key its connection ids are validated with are derived
/// from the TLS private key (HKDF-SHA256) instead of being random per
/// process. A process started after a crash on the same address, or any
/// node serving the same key, can then answer a packet of a connection it
/// does not know with a stateless reset the client accepts, so the client
/// learns at once that the connection is gone instead of waiting for its
/// idle timeout. Both keys change when the TLS key does.
pub fn endpoint_config(key: &PrivateKeyDer<'_>) -> Result<quinn::EndpointConfig, TlsError> {
    use ring::hkdf;

    /// An HKDF output length: the 8-byte connection id key.
    struct CidKeyLen;
    impl hkdf::KeyType for CidKeyLen {
        fn len(&self) -> usize {
            8
        }
    }

    let failed = |_| TlsError::Quic("deriving endpoint keys from the TLS key failed".into());
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(key.secret_der());
    let reset_key = ring::hmac::Key::from(
        prk.expand(&[RESET_KEY_LABEL], ring::hmac::HMAC_SHA256)
            .map_err(failed)?,
    );
    let mut cid_key = [0u8; 8];
    prk.expand(&[CID_KEY_LABEL], CidKeyLen)
        .and_then(|okm| okm.fill(&mut cid_key))
        .map_err(failed)?;
    let cid_key = u64::from_le_bytes(cid_key);
    let mut config = quinn::EndpointConfig::new(Arc::new(reset_key));
    // quinn drops short-header packets whose connection id its generator
    // does not validate, before considering a reset; with the default
    // (random per process) generator a restarted node would stay silent.
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    Ok(config)
}

/// ring's TLS 1.3 suites with AES-128-GCM/SHA-256 first (rustls's
/// default order starts with AES-256-GCM/SHA-384). Every QUIC packet is
/// sealed with the negotiated AEAD and the handshake hashes with its hash:
/// AES-128 takes 10 rounds to AES-256's 14, and SHA-256 runs on the SHA
/// extensions of current x86 and ARM CPUs where SHA-384 has none (a
/// handshake profile showed SHA-512 blocks as 6 % of the node's CPU).
/// Both suites are TLS 1.3 standard; a peer that only offers the others
/// still gets them.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
}

/// The QUIC server crypto config for a certificate chain and key. With
/// `client_ca`, every client must present a certificate chaining to one of
/// the CA certificates in that PEM file (mutual TLS).
///
/// With `web`, the node also offers ALPN `h3` (WebTransport) and serves
/// `web`'s certificate to clients that ask only for `h3` (browsers). The
/// node never combines the two (`server::webtransport_on`): browsers
/// cannot present client certificates.
pub fn server_crypto(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_ca: Option<&Path>,
    web: Option<Arc<WebCert>>,
) -> Result<quinn::crypto::rustls::QuicServerConfig, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match client_ca {
        Some(path) => {
            let roots = root_store(path)?;
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .map_err(|e| TlsError::Pem {
                path: path.to_owned(),
                what: format!("unusable client CA: {e}"),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut tls = match web {
        None => {
            let mut tls = builder.with_single_cert(certs, key)?;
            tls.alpn_protocols = vec![ALPN.to_vec()];
            tls
        }
        Some(web) => {
            let native = Arc::new(rustls::sign::CertifiedKey::from_der(
                certs,
                key,
                &provider(),
            )?);
            let mut tls = builder.with_cert_resolver(Arc::new(AlpnCerts { native, web }));
            // rustls picks the first of these that the client offers; the
            // resolver below mirrors that.
            tls.alpn_protocols = vec![ALPN.to_vec(), WEB_ALPN.to_vec()];
            tls
        }
    };
    // The node's suite order (see `provider`) wins over the client's: it
    // is the node that seals every delivery.
    tls.ignore_client_order = true;
    quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))
}

/// ALPN of HTTP/3, which WebTransport sessions run on.
pub const WEB_ALPN: &[u8] = b"h3";

/// How long a dev WebTransport certificate is valid in total: browsers
/// accept a certificate by its hash (`serverCertificateHashes`) only when
/// it is valid for at most 14 days, so 13 leaves room for clock skew.
const WEB_DEV_VALIDITY_DAYS: i64 = 13;
/// A dev WebTransport certificate with less than this left is replaced.
const WEB_DEV_RENEW_DAYS: i64 = 7;

/// The certificate WebTransport sessions get. With real certificates it is
/// the node's own chain and browsers verify it as any web site's. In dev
/// mode it is a self-signed ECDSA P-256 certificate valid 13 days, kept in
/// the certs directory (`webtransport.pem`, `webtransport.key`) so every
/// node sharing the directory serves the same one, replaced when less than
/// 7 days remain; pages connect to it by its SHA-256 hash.
#[derive(Debug)]
pub struct WebCert {
    /// The dev certificate's directory and names; None with real certificates.
    dev: Option<(PathBuf, Vec<String>)>,
    served: std::sync::RwLock<Served>,
}

#[derive(Debug)]
struct Served {
    key: Arc<rustls::sign::CertifiedKey>,
    /// SHA-256 of the served certificate (dev mode only).
    hash: Option<[u8; 32]>,
    /// SHA-256 of the certificate served before the last renewal: pages
    /// get it too, so while the nodes sharing the directory have not all
    /// reloaded yet (they do every minute) a page reaches either.
    previous: Option<[u8; 32]>,
}

impl WebCert {
    /// Serves the node's real certificate chain to browsers too.
    pub fn real(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsError> {
        Self::serving(None, chain, key, None)
    }

    /// The dev certificate in `dir` for `names`, generated when missing or
    /// due for renewal.
    pub fn dev(dir: &Path, names: &[String]) -> Result<Self, TlsError> {
        let (chain, key, hash) = load_dev_web_cert(dir, names, Renew::WhenDueOrRenamed)?;
        Self::serving(
            Some((dir.to_owned(), names.to_vec())),
            chain,
            key,
            Some(hash),
        )
    }

    fn serving(
        dev: Option<(PathBuf, Vec<String>)>,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        hash: Option<[u8; 32]>,
    ) -> Result<Self, TlsError> {
        let key = Arc::new(rustls::sign::CertifiedKey::from_der(
            chain,
            key,
            &provider(),
        )?);
        Ok(WebCert {
            dev,
            served: std::sync::RwLock::new(Served {
                key,
                hash,
                previous: None,
            }),
        })
    }

    /// Renews the dev certificate when due, and serves what the directory
    /// holds (a certificate another node renewed, say). Returns whether the
    /// served certificate changed. Nothing to do with real certificates.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let Some((dir, names)) = &self.dev else {
            return Ok(false);
        };
        let (chain, key, hash) = load_dev_web_cert(dir, names, Renew::WhenDue)?;
        let mut served = self.served.write().unwrap_or_else(|e| e.into_inner());
        if served.hash == Some(hash) {
            return Ok(false);
        }
        served.key = Arc::new(rustls::sign::CertifiedKey::from_der(
            chain,
            key,
            &provider(),
        )?);
        served.previous = served.hash.replace(hash);
        Ok(true)
    }

    /// The hashes a page should pass as `serverCertificateHashes`: the
    /// served certificate's, then the one it replaced (if that is still
    /// valid somewhere). Empty with real certificates.
    pub fn hashes(&self) -> Vec<[u8; 32]> {
        let served = self.served.read().unwrap_or_else(|e| e.into_inner());
        served.hash.into_iter().chain(served.previous).collect()
    }

    fn key(&self) -> Arc<rustls::sign::CertifiedKey> {
        self.served
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .key
            .clone()
    }
}

/// Picks the certificate by ALPN: a client that asks only for `h3` is a
/// browser and gets the WebTransport certificate.
#[derive(Debug)]
struct AlpnCerts {
    native: Arc<rustls::sign::CertifiedKey>,
    web: Arc<WebCert>,
}

impl rustls::server::ResolvesServerCert for AlpnCerts {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let offers = |p: &[u8]| hello.alpn().is_some_and(|mut all| all.any(|a| a == p));
        if offers(WEB_ALPN) && !offers(ALPN) {
            Some(self.web.key())
        } else {
            Some(self.native.clone())
        }
    }
}

/// When [`load_dev_web_cert`] makes a new certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Renew {
    /// Missing, or less than 7 days left.
    WhenDue,
    /// That, or made for other names (at start: nodes sharing a directory
    /// with other `cert_names` would otherwise replace each other's
    /// certificate every minute).
    WhenDueOrRenamed,
}

/// The dev WebTransport certificate in `dir`: (chain, key, SHA-256 of the
/// certificate), generated under the directory's lock when missing, due
/// for renewal, or (with [`Renew::WhenDueOrRenamed`]) made for other names.
fn load_dev_web_cert(
    dir: &Path,
    names: &[String],
    renew: Renew,
) -> Result<
    (
        Vec<CertificateDer<'static>>,
        PrivateKeyDer<'static>,
        [u8; 32],
    ),
    TlsError,
> {
    let certs = CertsDir::lock(dir)?;
    let cert_path = dir.join("webtransport.pem");
    let key_path = dir.join("webtransport.key");
    let names_path = dir.join("webtransport.names");
    let wanted = names.join("\n");
    let now = time::OffsetDateTime::now_utc();
    // When the certificate in the directory expires (None: missing,
    // unreadable, or without its key).
    let not_after = || -> Option<time::OffsetDateTime> {
        if !key_path.exists() {
            return None;
        }
        let chain = load_certs(&cert_path).ok()?;
        let (_, parsed) = x509_parser::parse_x509_certificate(chain.first()?.as_ref()).ok()?;
        Some(parsed.validity().not_after.to_datetime())
    };
    let not_after = not_after();
    let renamed = fs::read_to_string(&names_path).ok().as_deref() != Some(wanted.as_str());
    let fresh = !(renamed && renew == Renew::WhenDueOrRenamed)
        && not_after.is_some_and(|t| t - now > time::Duration::days(WEB_DEV_RENEW_DAYS));
    let still_valid = not_after.is_some_and(|t| t > now + time::Duration::hours(1));
    if !fresh {
        if let Err(err) = certs.writable("the WebTransport dev certificate") {
            // A read-only directory (a container's mount): serve what is
            // there while it is valid; renewing is up to whoever writes it
            // (`fabric-node gen-certs`).
            if !still_valid {
                return Err(err);
            }
            tracing::warn!(
                dir = %dir.display(),
                "the WebTransport dev certificate is due for renewal (or made for other names) \
                 but the directory is read-only: serving it as it is"
            );
        } else {
            generate_web_cert(&cert_path, &key_path, &names_path, names, &wanted, now)?;
        }
    }
    let chain = load_certs(&cert_path)?;
    let key = load_key(&key_path)?;
    let hash = web_cert_hash(&chain[0]);
    Ok((chain, key, hash))
}

/// Writes a new WebTransport dev certificate valid from an hour ago.
fn generate_web_cert(
    cert_path: &Path,
    key_path: &Path,
    names_path: &Path,
    names: &[String],
    wanted: &str,
    now: time::OffsetDateTime,
) -> Result<(), TlsError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(names.to_vec())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "quic-fabric WebTransport (dev)");
    params.not_before = now - time::Duration::hours(1);
    params.not_after = params.not_before + time::Duration::days(WEB_DEV_VALIDITY_DAYS);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.self_signed(&key)?;
    write_atomic(key_path, key.serialize_pem().as_bytes(), true)?;
    write_atomic(cert_path, cert.pem().as_bytes(), false)?;
    write_atomic(names_path, wanted.as_bytes(), false)
}

/// SHA-256 of a certificate's DER: what `serverCertificateHashes` holds.
pub fn web_cert_hash(cert: &CertificateDer<'_>) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
    let mut hash = [0u8; 32];
    hash.copy_from_slice(digest.as_ref());
    hash
}

/// How a client decides whether to trust the server.
#[derive(Debug, Clone)]
pub enum ServerTrust {
    /// Verify against the CA certificates in this PEM file.
    CaFile(PathBuf),
    /// Accept any certificate. Only for development, only when asked for explicitly.
    InsecureAcceptAny,
}

/// A client certificate and its key (PEM files), for nodes that require
/// mutual TLS.
#[derive(Debug, Clone)]
pub struct ClientCert {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
}

fn root_store(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// The QUIC client crypto config for the given trust, presenting
/// `identity` when given.
pub fn client_crypto(
    trust: &ServerTrust,
    identity: Option<&ClientCert>,
) -> Result<quinn::crypto::rustls::QuicClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match trust {
        ServerTrust::CaFile(path) => builder.with_root_certificates(root_store(path)?),
        ServerTrust::InsecureAcceptAny => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider()))),
    };
    let mut tls = match identity {
        Some(id) => builder.with_client_auth_cert(load_certs(&id.cert)?, load_key(&id.key)?)?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))
}

/// Accepts any server certificate, but still checks handshake signatures so
/// the connection is at least bound to the presented key.
#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;

    fn names() -> Vec<String> {
        vec!["localhost".into(), "127.0.0.1".into()]
    }

    /// (not before, not after, public key algorithm OID) of `dir`'s
    /// WebTransport certificate.
    fn web_cert_facts(dir: &Path) -> (time::OffsetDateTime, time::OffsetDateTime, String) {
        let chain = load_certs(&dir.join("webtransport.pem")).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(chain[0].as_ref()).unwrap();
        let v = parsed.validity();
        let curve = parsed
            .public_key()
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .map(|oid| oid.to_id_string())
            .unwrap_or_default();
        (v.not_before.to_datetime(), v.not_after.to_datetime(), curve)
    }

    #[test]
    fn the_webtransport_dev_certificate_is_what_browsers_accept_by_hash() {
        let dir = tempfile::tempdir().unwrap();
        let web = WebCert::dev(dir.path(), &names()).unwrap();
        let (from, until, curve) = web_cert_facts(dir.path());
        // ECDSA P-256 (prime256v1), valid at most 14 days in total.
        assert_eq!(curve, "1.2.840.10045.3.1.7");
        assert!(until - from <= time::Duration::days(14));
        assert!(from <= time::OffsetDateTime::now_utc());
        // The hash published is the SHA-256 of the certificate served.
        let chain = load_certs(&dir.path().join("webtransport.pem")).unwrap();
        assert_eq!(web.hashes(), vec![web_cert_hash(&chain[0])]);
        // Another node sharing the directory serves the same one.
        let other = WebCert::dev(dir.path(), &names()).unwrap();
        assert_eq!(other.hashes(), web.hashes());
        assert!(!web.reload().unwrap(), "nothing to renew");
    }

    #[test]
    fn a_webtransport_dev_certificate_due_for_renewal_is_replaced_and_both_hashes_published() {
        let dir = tempfile::tempdir().unwrap();
        let web = WebCert::dev(dir.path(), &names()).unwrap();
        let first = web.hashes()[0];
        // Made 7 days ago: less than 7 days left.
        let paths = ["webtransport.pem", "webtransport.key", "webtransport.names"]
            .map(|f| dir.path().join(f));
        let aged = time::OffsetDateTime::now_utc() - time::Duration::days(7);
        generate_web_cert(
            &paths[0],
            &paths[1],
            &paths[2],
            &names(),
            &names().join("\n"),
            aged,
        )
        .unwrap();
        assert!(web.reload().unwrap(), "renewed");
        let hashes = web.hashes();
        assert_eq!(hashes.len(), 2);
        assert_ne!(hashes[0], first);
        assert_eq!(hashes[1], first, "the replaced one is still published");
        let (from, _, _) = web_cert_facts(dir.path());
        assert!(time::OffsetDateTime::now_utc() - from < time::Duration::hours(2));
    }

    #[test]
    fn dev_certs_are_generated_once_and_renewed_when_names_change() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let paths = ensure_dev_certs(dir.path(), &names).unwrap();
        let ca_before = fs::read(&paths.ca_cert).unwrap();
        let server_before = fs::read(&paths.server_cert).unwrap();

        ensure_dev_certs(dir.path(), &names).unwrap();
        assert_eq!(
            fs::read(&paths.server_cert).unwrap(),
            server_before,
            "reused"
        );

        let more = vec!["localhost".to_string(), "lb".to_string()];
        ensure_dev_certs(dir.path(), &more).unwrap();
        assert_eq!(fs::read(&paths.ca_cert).unwrap(), ca_before, "CA kept");
        assert_ne!(
            fs::read(&paths.server_cert).unwrap(),
            server_before,
            "renewed"
        );

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&paths.server_key)
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "private key readable by others: {mode:o}");
        }
        // The pieces load into working configs.
        server_crypto(
            load_certs(&paths.server_cert).unwrap(),
            load_key(&paths.server_key).unwrap(),
            None,
            None,
        )
        .unwrap();
        client_crypto(&ServerTrust::CaFile(paths.ca_cert), None).unwrap();
    }

    /// Nodes started together on one certs directory, half of them with
    /// other names (a renewal racing a start): every node must get a key
    /// that belongs to its certificate, signed by the CA that stays.
    #[test]
    fn concurrent_starts_and_renewals_get_consistent_certificates() {
        const THREADS: usize = 16;
        let name_sets = [
            vec!["localhost".to_string(), "127.0.0.1".to_string()],
            vec!["localhost".to_string(), "lb".to_string()],
        ];
        for round in 0..4 {
            let dir = tempfile::tempdir().unwrap();
            let start = Arc::new(std::sync::Barrier::new(THREADS));
            let threads: Vec<_> = (0..THREADS)
                .map(|i| {
                    let (dir, names) = (dir.path().to_owned(), name_sets[i % 2].clone());
                    let start = start.clone();
                    std::thread::spawn(move || {
                        start.wait();
                        let got = load_dev_certs(&dir, &names);
                        (names, got)
                    })
                })
                .collect();
            let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
            let roots = root_store(&DevCertPaths::in_dir(dir.path()).ca_cert).unwrap();
            let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .unwrap();
            for (names, got) in results {
                let dev = got.unwrap_or_else(|e| panic!("round {round}, {names:?}: {e}"));
                server_crypto(dev.chain.clone(), dev.key, None, None)
                    .unwrap_or_else(|e| panic!("round {round}, {names:?}: {e}"));
                let name = ServerName::try_from(names[1].clone()).unwrap();
                verifier
                    .verify_server_cert(&dev.chain[0], &dev.chain[1..], &name, &[], UnixTime::now())
                    .unwrap_or_else(|e| panic!("round {round}, {names:?} vs final ca.pem: {e}"));
            }
        }
    }

    /// A directory whose lock file cannot be created (a read-only mount)
    /// serves what it holds, and says so clearly when it would have to change.
    #[cfg(unix)]
    #[test]
    fn an_unlockable_directory_is_used_as_is_and_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_string()];
        let first = load_dev_certs(dir.path(), &names).unwrap();
        // Root ignores permissions, so a lock path that cannot be opened
        // stands in for the read-only mount.
        fs::remove_file(&first.paths.lock).unwrap();
        std::os::unix::fs::symlink(dir.path().join("gone/.lock"), &first.paths.lock).unwrap();

        let again = load_dev_certs(dir.path(), &names).unwrap();
        assert_eq!(again.chain, first.chain);
        assert_eq!(again.key, first.key);

        let err = load_dev_certs(dir.path(), &["lb".to_string()]).unwrap_err();
        assert!(matches!(err, TlsError::Lock { .. }), "{err}");
        assert!(err.to_string().contains("server certificate"), "{err}");
        let err = issue_dev_client_cert(dir.path(), "bob").unwrap_err();
        assert!(matches!(err, TlsError::Lock { .. }), "{err}");
        assert_eq!(load_certs(&first.paths.server_cert).unwrap(), first.chain);
        assert!(!dir.path().join("client-bob.pem").exists());
    }

    #[test]
    fn missing_ca_file_is_a_clear_error() {
        let Err(err) = client_crypto(&ServerTrust::CaFile("/nonexistent/ca.pem".into()), None)
        else {
            panic!("a missing CA file must be an error");
        };
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }
}
