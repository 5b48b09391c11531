//! TLS for the edge's listeners: server configurations, certificates, reloads, the TLS stream
//! itself, and channel binding.
//!
//! - STARTTLS (RFC 6120 §5) uses [`Alpn::None`]; direct TLS (XEP-0368 §3) uses
//!   [`Alpn::XmppClient`], which negotiates the ALPN protocol `xmpp-client` (RFC 7301).
//! - TLS 1.2 and 1.3 only ([`PROTOCOL_VERSIONS`]), ring provider, no client certificates.
//! - Certificates come from configured PEM files, selected per connection by SNI (RFC 6066 §3,
//!   names and wildcards as in RFC 6125 §6.4), or from a self-signed certificate generated into
//!   `<data_dir>/tls/` when none is configured.
//! - [`TlsManager::reload`] swaps the whole certificate set atomically: established sessions
//!   keep theirs, new handshakes get the new one; a reload that fails keeps the old set.
//! - [`TlsManager::accept`] runs a handshake on a TCP stream and returns a [`TlsStream`]
//!   (rustls's unbuffered API: an idle connection holds no buffer, see `stream`) with the
//!   connection's channel-binding data for SASL: `tls-exporter` (RFC 9266, TLS 1.3 only) and
//!   `tls-server-end-point` (RFC 5929 §4.1), caught during the handshake (see `capture`).
//!
//! This module decrypts and encrypts bytes but never interprets them, and never decides who
//! may connect; it hands plaintext to the connection and binding data to SASL.

mod capture;
mod certs;
mod der;
mod generate;
mod pool;
mod stream;

#[cfg(test)]
mod tests;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use sha2::Digest;
use starling_sasl::{ChannelBindingInfo, ChannelBindingType};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

pub use der::DerError;
pub use stream::TlsStream;

use certs::{CertEntry, CertResolver, CertSet};

/// The TLS versions the edge accepts: 1.3 and 1.2, nothing older.
pub const PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The ALPN protocol of direct TLS for client-to-server streams (XEP-0368 §3).
pub const ALPN_XMPP_CLIENT: &[u8] = b"xmpp-client";

/// The RFC 9266 exporter label of `tls-exporter`.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-Channel-Binding";
/// RFC 9266 §2: 32 bytes of keying material.
const EXPORTER_LEN: usize = 32;

/// One configured certificate chain (leaf first) and its private key, both PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    pub key: PathBuf,
}

/// TLS settings of the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM files to serve. Empty: a self-signed certificate is generated into
    /// `<data_dir>/tls/`.
    pub certificates: Vec<CertFiles>,
    /// The server's data directory.
    pub data_dir: PathBuf,
    /// The served domains, first one preferred when a client sends no SNI.
    pub domains: Vec<String>,
    /// How often [`TlsManager::spawn_watcher`] checks the files; zero disables the watcher.
    pub reload_check: Duration,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            certificates: Vec::new(),
            data_dir: PathBuf::from("data"),
            domains: vec!["localhost".to_owned()],
            reload_check: Duration::from_secs(30),
        }
    }
}

/// Which listener a server configuration is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alpn {
    /// STARTTLS on the plain-text port: no ALPN.
    None,
    /// Direct TLS (XEP-0368): ALPN `xmpp-client`.
    XmppClient,
}

/// Why certificates could not be loaded or generated. All of these are startup or reload
/// failures; none is ever sent to a peer.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A generated file could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A PEM section could not be decoded.
    #[error("{}: bad PEM: {reason}", path.display())]
    Pem { path: PathBuf, reason: String },
    /// The certificate file holds no certificate.
    #[error("{}: no certificate in the file", path.display())]
    NoCertificate { path: PathBuf },
    /// The leaf certificate is not valid DER X.509.
    #[error("{}: malformed leaf certificate: {reason}", path.display())]
    Certificate { path: PathBuf, reason: DerError },
    /// No key in the file, or one the ring provider cannot use.
    #[error("{}: no usable private key: {reason}", path.display())]
    Key { path: PathBuf, reason: String },
    /// The key's public half differs from the leaf certificate's.
    #[error("the key {} does not belong to the certificate {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    /// Nothing to generate a certificate for.
    #[error("no certificate configured and no domain to generate one for")]
    NoDomains,
    /// rcgen refused (e.g. a domain that is not a valid DNS name).
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Counts a failed TLS handshake (`starling_tls_handshake_failures_total`); the listeners call
/// it whenever an accept fails.
pub fn record_handshake_failure() {
    metrics::counter!("starling_tls_handshake_failures_total").increment(1);
}

fn record_reload(outcome: &'static str) {
    metrics::counter!("starling_tls_reloads_total", "outcome" => outcome).increment(1);
}

/// Where the certificates come from.
#[derive(Debug)]
enum Source {
    Files(Vec<CertFiles>),
    /// Generated into this directory (`<data_dir>/tls`).
    Generated(PathBuf),
}

/// The certificates, the server configurations using them, and their reloading.
#[derive(Debug)]
pub struct TlsManager {
    source: Source,
    /// Lower case, in configuration order.
    domains: Vec<String>,
    reload_check: Duration,
    provider: Arc<CryptoProvider>,
    resolver: Arc<CertResolver>,
    starttls: Arc<ServerConfig>,
    direct_tls: Arc<ServerConfig>,
    /// What the set in service was loaded from; the lock serialises reloads.
    loaded: Mutex<LoadState>,
}

/// Identity of the files behind the set in service.
#[derive(Debug)]
struct LoadState {
    /// SHA-256 over the contents of the files, compared to decide whether a reload swaps.
    fingerprint: [u8; 32],
    /// The files' modification times and lengths just before they were read; the watcher's
    /// starting point.
    stats: StatSignature,
}

/// Modification time and length of each watched file (`None` when it cannot be read).
type StatSignature = Vec<Option<(SystemTime, u64)>>;

/// The files read for one certificate set, and the set built from them.
struct Loaded {
    set: CertSet,
    fingerprint: [u8; 32],
}

impl TlsManager {
    /// Loads the configured certificates, or generates/reuses the self-signed one, and builds
    /// the server configurations. Blocking: reads files and may generate a key.
    pub fn load(settings: TlsSettings) -> Result<Arc<TlsManager>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let domains: Vec<String> = settings
            .domains
            .iter()
            .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
            .collect();
        let source = if settings.certificates.is_empty() {
            Source::Generated(settings.data_dir.join("tls"))
        } else {
            Source::Files(settings.certificates)
        };
        let (loaded, stats) = load_source(&source, &domains, &provider)?;
        let resolver = Arc::new(CertResolver::new(loaded.set));
        let tickets = rustls::crypto::ring::Ticketer::new()?;
        let starttls = server_config(&provider, &resolver, &tickets, Alpn::None)?;
        let direct_tls = server_config(&provider, &resolver, &tickets, Alpn::XmppClient)?;
        Ok(Arc::new(TlsManager {
            source,
            domains,
            reload_check: settings.reload_check,
            provider,
            resolver,
            starttls,
            direct_tls,
            loaded: Mutex::new(LoadState {
                fingerprint: loaded.fingerprint,
                stats,
            }),
        }))
    }

    /// The server configuration for a listener. Both share one certificate resolver, so a
    /// reload reaches them without rebuilding anything.
    pub fn server_config(&self, alpn: Alpn) -> Arc<ServerConfig> {
        match alpn {
            Alpn::None => self.starttls.clone(),
            Alpn::XmppClient => self.direct_tls.clone(),
        }
    }

    /// The generated certificate's PEM file, when no certificate is configured (clients and
    /// tests trust it explicitly).
    pub fn generated_cert_path(&self) -> Option<PathBuf> {
        match &self.source {
            Source::Generated(dir) => Some(generate::cert_path(dir)),
            Source::Files(_) => None,
        }
    }

    /// Re-reads the certificate files (or regenerates the self-signed certificate when it no
    /// longer fits) and swaps the set in if anything changed. Returns whether it swapped. On
    /// error the old certificates stay in service. Blocking, like [`TlsManager::load`].
    pub fn reload(&self) -> Result<bool, TlsError> {
        let _span = tracing::info_span!("tls_reload").entered();
        // Held for the whole reload: a SIGHUP and the watcher never interleave.
        let mut state = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        match load_source(&self.source, &self.domains, &self.provider) {
            Ok((loaded, stats)) if loaded.fingerprint == state.fingerprint => {
                state.stats = stats;
                record_reload("unchanged");
                tracing::debug!("TLS certificates unchanged");
                Ok(false)
            }
            Ok((loaded, stats)) => {
                self.resolver.swap(loaded.set);
                *state = LoadState {
                    fingerprint: loaded.fingerprint,
                    stats,
                };
                record_reload("changed");
                tracing::info!("TLS certificates reloaded; new handshakes use them");
                Ok(true)
            }
            Err(error) => {
                record_reload("error");
                tracing::error!(%error, "TLS reload failed; keeping the current certificates");
                Err(error)
            }
        }
    }

    /// Polls the certificate files' modification times and lengths every `reload_check` and
    /// calls [`TlsManager::reload`] when they change (or when the generated certificate is
    /// about to expire). Ends when `cancel` fires; with a zero `reload_check` it only waits for
    /// that.
    pub fn spawn_watcher(
        self: &Arc<Self>,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let manager = Arc::clone(self);
        // Compared against the files as they were when last loaded, so a change made between
        // loading and the watcher's first poll is not missed.
        let mut last = manager
            .loaded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .stats
            .clone();
        tokio::spawn(async move {
            if manager.reload_check.is_zero() {
                cancel.cancelled().await;
                return;
            }
            let mut interval = tokio::time::interval(manager.reload_check);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval.tick().await; // the first tick is immediate
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    _ = interval.tick() => {}
                }
                let signature = stat_signature(&manager.source);
                if signature == last && !manager.generated_expiring() {
                    continue;
                }
                last = signature;
                let reloading = Arc::clone(&manager);
                // Errors are logged and counted by `reload`.
                if let Err(error) = tokio::task::spawn_blocking(move || reloading.reload()).await {
                    tracing::error!(%error, "TLS reload task failed");
                }
            }
        })
    }

    /// Runs the TLS handshake of a new connection (the caller bounds it in time) and returns
    /// the established stream with its channel-binding data for SCRAM-PLUS (RFC 5056):
    /// - `tls-exporter` (RFC 9266): 32 bytes exported with label `EXPORTER-Channel-Binding`
    ///   and no context, offered only when TLS 1.3 was negotiated (RFC 9266 §3 forbids it on
    ///   TLS 1.2 without extended master secret, which rustls does not report).
    /// - `tls-server-end-point` (RFC 5929 §4.1): the hash of the leaf certificate this
    ///   handshake served (so a reload during the handshake cannot make it wrong), omitted for
    ///   EdDSA or unknown signature algorithms.
    ///
    /// A failed handshake sends rustls's alert (best effort) and returns the error.
    pub async fn accept(
        &self,
        tcp: TcpStream,
        alpn: Alpn,
    ) -> io::Result<(TlsStream, ChannelBindingInfo)> {
        let (stream, captured) = TlsStream::accept(tcp, self.server_config(alpn)).await?;
        let info = channel_binding(&stream, captured);
        Ok((stream, info))
    }

    /// Whether the generated certificate in service is about to expire.
    fn generated_expiring(&self) -> bool {
        if !matches!(self.source, Source::Generated(_)) {
            return false;
        }
        let limit = generate::unix_now().saturating_add(generate::RENEW_BEFORE_SECS);
        self.resolver
            .current()
            .entries()
            .iter()
            .any(|entry| entry.not_after <= limit)
    }
}

/// The channel-binding data of an established stream, from what its handshake revealed.
fn channel_binding(stream: &TlsStream, captured: capture::Captured) -> ChannelBindingInfo {
    let mut info = ChannelBindingInfo::none();
    if stream.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3) {
        let suite = match stream.negotiated_cipher_suite() {
            Some(rustls::SupportedCipherSuite::Tls13(suite)) => Some(suite),
            _ => None,
        };
        let mut data = [0u8; EXPORTER_LEN];
        match (suite, &captured.exporter_secret) {
            (Some(suite), Some(secret)) => {
                match capture::exporter(suite, secret, EXPORTER_LABEL, &[], &mut data) {
                    Ok(()) => info = info.with(ChannelBindingType::TlsExporter, data.to_vec()),
                    Err(_) => tracing::warn!("tls-exporter unavailable: bad output length"),
                }
            }
            _ => tracing::warn!("tls-exporter unavailable: no exporter secret"),
        }
    }
    if let Some(data) = captured.end_point {
        info = info.with(ChannelBindingType::TlsServerEndPoint, data);
    }
    info
}

fn stat_signature(source: &Source) -> StatSignature {
    let stat = |path: &Path| {
        fs::metadata(path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())))
    };
    match source {
        Source::Files(files) => files
            .iter()
            .flat_map(|f| [stat(&f.cert), stat(&f.key)])
            .collect(),
        Source::Generated(dir) => {
            vec![
                stat(&generate::cert_path(dir)),
                stat(&generate::key_path(dir)),
            ]
        }
    }
}

/// Reads (or generates) every certificate of `source` and builds a set from them. Also returns
/// the files' stat signature: taken before reading configured files (so a change made while
/// reading is seen by the next poll), after writing generated ones (which only we write).
fn load_source(
    source: &Source,
    domains: &[String],
    provider: &CryptoProvider,
) -> Result<(Loaded, StatSignature), TlsError> {
    let stats_before = stat_signature(source);
    let mut hasher = sha2::Sha256::new();
    let mut entries = Vec::new();
    let mut add = |cert_pem: &[u8], key_pem: &[u8], entry: CertEntry| {
        for bytes in [cert_pem, key_pem] {
            hasher.update((bytes.len() as u64).to_be_bytes());
            hasher.update(bytes);
        }
        entries.push(entry);
    };
    match source {
        Source::Files(files) => {
            let now = generate::unix_now();
            for files in files {
                let read = |path: &Path| {
                    fs::read(path).map_err(|source| TlsError::Read {
                        path: path.to_owned(),
                        source,
                    })
                };
                let cert_pem = read(&files.cert)?;
                let key_pem = read(&files.key)?;
                let entry =
                    certs::load_entry(&cert_pem, &key_pem, &files.cert, &files.key, provider)?;
                if entry.names.is_empty() {
                    tracing::warn!(
                        path = %files.cert.display(),
                        "certificate has no DNS subjectAltName; served only as a fallback"
                    );
                }
                if entry.not_after <= now {
                    tracing::warn!(path = %files.cert.display(), "certificate has expired");
                }
                tracing::info!(
                    path = %files.cert.display(),
                    names = ?entry.names,
                    "loaded TLS certificate"
                );
                add(&cert_pem, &key_pem, entry);
            }
        }
        Source::Generated(dir) => {
            let (material, outcome) =
                generate::ensure(dir, domains, generate::unix_now(), provider)?;
            let path = generate::cert_path(dir);
            match outcome {
                generate::Outcome::Reused => tracing::info!(
                    path = %path.display(),
                    domains = ?domains,
                    "reusing the self-signed TLS certificate"
                ),
                generate::Outcome::Generated(reason) => tracing::info!(
                    path = %path.display(),
                    domains = ?domains,
                    reason = reason.as_str(),
                    "generated a self-signed TLS certificate"
                ),
            }
            add(&material.cert_pem, &material.key_pem, material.entry);
        }
    }
    let fingerprint: [u8; 32] = hasher.finalize().into();
    let set = CertSet::new(entries, domains).ok_or(TlsError::NoDomains)?;
    for domain in domains {
        if !set.entries().iter().any(|e| e.covers(domain)) {
            tracing::warn!(%domain, "no TLS certificate names this domain");
        }
    }
    let stats = match source {
        Source::Files(_) => stats_before,
        Source::Generated(_) => stat_signature(source),
    };
    Ok((Loaded { set, fingerprint }, stats))
}

/// A server configuration over the shared resolver: TLS 1.2/1.3, no client authentication.
///
/// **Session resumption** is by stateless tickets (`tickets`, rustls's rotating ticketer:
/// a key lives 6 hours and tickets of the previous key are still accepted): the server keeps
/// nothing per client, so every device of a fleet can resume, not only the few hundred a
/// session cache would hold, and a resumed handshake costs a device no certificate
/// verification. TLS 1.3 resumption still runs a fresh (EC)DHE exchange (rustls offers only
/// `psk_dhe_ke`), so traffic keys keep forward secrecy; no early data is accepted. One
/// ticket per handshake (rustls sends two by default): an XMPP client holds one stream per
/// account, and each resumption gets a new ticket, so the second would only be bytes on a
/// device's link.
fn server_config(
    provider: &Arc<CryptoProvider>,
    resolver: &Arc<CertResolver>,
    tickets: &Arc<dyn rustls::server::ProducesTickets>,
    alpn: Alpn,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    config.ticketer = tickets.clone();
    config.send_tls13_tickets = 1;
    // Only to catch the exporter secret of a handshake being accepted; see `capture`.
    config.key_log = Arc::new(capture::ExporterSecretLog);
    config.alpn_protocols = match alpn {
        Alpn::None => Vec::new(),
        Alpn::XmppClient => vec![ALPN_XMPP_CLIENT.to_vec()],
    };
    Ok(Arc::new(config))
}
