//! TLS on the gRPC listener: certificate and key from PEM files, re-read when they change
//! (cert-manager rotates them in place), and optional client-certificate verification
//! against a CA (mTLS). Handshakes run off the accept loop, bounded in time, so a slow or
//! broken client cannot hold up others. The serving certificate's notAfter is kept for
//! `tokengate_tls_certificate_expiry_timestamp_seconds`, and follows every reload.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// How often the certificate files are checked for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// Longest a client may take to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once. Each holds a task, a socket and rustls state for up to
/// [`HANDSHAKE_TIMEOUT`]; beyond this many, a new connection is closed at once, so clients
/// that connect and never speak cannot pile up thousands of them.
pub const MAX_HANDSHAKES: usize = 256;

/// The PEM files of the listener's TLS.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Present: callers must present a certificate issued by this CA.
    pub client_ca_file: Option<PathBuf>,
}

impl TlsFiles {
    fn paths(&self) -> impl Iterator<Item = &Path> {
        [
            Some(&self.cert_file),
            Some(&self.key_file),
            self.client_ca_file.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(PathBuf::as_path)
    }

    /// Reads the files and builds the rustls configuration (HTTP/2 only, as gRPC needs).
    pub fn load(&self) -> Result<ServerConfig, TlsError> {
        self.load_with_expiry().map(|(config, _)| config)
    }

    /// [`TlsFiles::load`], with the serving (first) certificate's notAfter in Unix seconds.
    fn load_with_expiry(&self) -> Result<(ServerConfig, i64), TlsError> {
        let cert_file = || self.cert_file.clone();
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert_file)
            .and_then(Iterator::collect)
            .map_err(|source| TlsError::CertFile {
                path: cert_file(),
                source,
            })?;
        let Some(serving) = certs.first() else {
            return Err(TlsError::NoCertificate { path: cert_file() });
        };
        let not_after = not_after(serving).map_err(|source| TlsError::Certificate {
            path: cert_file(),
            source,
        })?;
        let key =
            PrivateKeyDer::from_pem_file(&self.key_file).map_err(|source| TlsError::KeyFile {
                path: self.key_file.clone(),
                source,
            })?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Protocols)?;
        let builder = match &self.client_ca_file {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let client_ca = |source: ClientCaError| TlsError::ClientCa {
                    path: path.clone(),
                    source,
                };
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(path)
                    .map_err(|e| client_ca(ClientCaError::Pem(e)))?
                {
                    let cert = cert.map_err(|e| client_ca(ClientCaError::Pem(e)))?;
                    roots
                        .add(cert)
                        .map_err(|e| client_ca(ClientCaError::Certificate(e)))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| client_ca(ClientCaError::Verifier(e)))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(TlsError::KeyMismatch)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok((config, not_after))
    }

    fn stamps(&self) -> Stamps {
        self.paths()
            .map(|p| {
                std::fs::metadata(p)
                    .ok()
                    .and_then(|m| Some((m.modified().ok()?, m.len())))
            })
            .collect()
    }
}

/// A certificate's notAfter, in Unix seconds.
fn not_after(cert: &CertificateDer<'_>) -> Result<i64, X509Error> {
    use x509_parser::prelude::{FromDer as _, X509Certificate};
    let (_, cert) = X509Certificate::from_der(cert)?;
    Ok(cert.validity().not_after.timestamp())
}

/// x509-parser's error for a certificate it cannot read.
type X509Error = x509_parser::nom::Err<x509_parser::error::X509Error>;

/// Why the listener's TLS files cannot be used. Check-config prints it as its reason; a
/// failed reload logs it and keeps serving the previous files.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("server.tls.cert_file {}: {source}", path.display())]
    CertFile {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("server.tls.cert_file {} holds no certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("server.tls.cert_file {}: cannot read the certificate: {source}", path.display())]
    Certificate { path: PathBuf, source: X509Error },
    #[error("server.tls.key_file {}: {source}", path.display())]
    KeyFile {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("TLS: {0}")]
    Protocols(rustls::Error),
    #[error("server.tls.client_ca_file {}: {source}", path.display())]
    ClientCa {
        path: PathBuf,
        source: ClientCaError,
    },
    #[error("server.tls: the certificate and key do not match: {0}")]
    KeyMismatch(rustls::Error),
}

/// What is wrong with `server.tls.client_ca_file`.
#[derive(Debug, thiserror::Error)]
pub enum ClientCaError {
    #[error(transparent)]
    Pem(rustls_pki_types::pem::Error),
    #[error(transparent)]
    Certificate(rustls::Error),
    #[error(transparent)]
    Verifier(rustls::server::VerifierBuilderError),
}

/// What identifies one version of the TLS files: each file's modification time and size.
type Stamps = Vec<Option<(SystemTime, u64)>>;

/// The listener's current TLS configuration, replaced when its files change.
pub struct ReloadingTls {
    files: TlsFiles,
    current: RwLock<(Arc<ServerConfig>, Stamps)>,
    /// The serving certificate's notAfter (Unix seconds), of the configuration in use.
    not_after: AtomicI64,
}

impl std::fmt::Debug for ReloadingTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ReloadingTls {
    pub fn new(files: TlsFiles) -> Result<Self, TlsError> {
        let stamps = files.stamps();
        let (config, not_after) = files.load_with_expiry()?;
        Ok(Self {
            files,
            current: RwLock::new((Arc::new(config), stamps)),
            not_after: AtomicI64::new(not_after),
        })
    }

    /// When the certificate being served expires, in Unix seconds.
    pub fn not_after(&self) -> i64 {
        self.not_after.load(Ordering::Relaxed)
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0
                .clone(),
        )
    }

    /// Re-reads the files if any changed. A broken set keeps the previous configuration
    /// serving, and is reported once.
    pub fn reload_if_changed(&self) {
        let stamps = self.files.stamps();
        if stamps
            == self
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .1
        {
            return;
        }
        let loaded = self.files.load_with_expiry();
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match loaded {
            Ok((config, not_after)) => {
                *current = (Arc::new(config), stamps);
                self.not_after.store(not_after, Ordering::Relaxed);
                tracing::info!(cert_file = %self.files.cert_file.display(), "reloaded the TLS certificate");
            }
            Err(error) => {
                current.1 = stamps;
                tracing::warn!(%error, "the changed TLS files cannot be used; keeping the previous ones");
            }
        }
    }
}

/// Checks the TLS files for changes until the task is dropped.
pub async fn watch(tls: Arc<ReloadingTls>) {
    let mut tick = tokio::time::interval(RELOAD_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Metadata reads of a few local files: cheap, but still kept off the runtime threads.
        let tls = tls.clone();
        let _ = tokio::task::spawn_blocking(move || tls.reload_if_changed()).await;
    }
}

/// TLS connections accepted on `listener`. The listener closes when the stream is dropped
/// (as tonic does at shutdown), so new connections are refused from then on.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ReloadingTls>,
) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(128);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tx.closed() => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        let Ok(handshake) = handshakes.clone().try_acquire_owned() else {
                            tracing::debug!(%peer, "too many TLS handshakes in progress; closing the connection");
                            continue;
                        };
                        let _ = tcp.set_nodelay(true);
                        let acceptor = tls.acceptor();
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            let shaken = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                            drop(handshake);
                            match shaken {
                                Ok(Ok(stream)) => {
                                    let _ = tx.send(Ok(stream)).await;
                                }
                                Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                            }
                        });
                    }
                    Err(error) => {
                        // Out of file descriptors, most likely: back off instead of spinning.
                        tracing::warn!(%error, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    });
    ReceiverStream::new(rx)
}
