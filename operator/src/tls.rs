//! The node channel's TLS: a serving certificate that is re-read when its files change.
//!
//! Certificates expire (cert-manager's last 90 days) and are renewed in place: the kubelet
//! writes a mounted Secret's new files into a fresh directory and swaps the `..data` symlink, so
//! the paths stay and what they lead to changes. Before each TLS handshake the server `stat`s
//! both files (following the symlinks; no inotify, which would watch the old file) and loads the
//! pair when either changed. Connections already open are not touched: their sessions go on
//! with the certificate they were opened with. A new pair that does not load (unparsable, or a
//! key that is not the certificate's) is logged once and the previous pair is served meanwhile.

use std::{
    fmt,
    fs::Metadata,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use tokio::{net::TcpStream, task::JoinSet};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self, ServerConfig,
        crypto::CryptoProvider,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        server::{ClientHello, ResolvesServerCert},
        sign::CertifiedKey,
    },
    server::TlsStream,
};
use tokio_stream::Stream;
use tonic::transport::server::TcpIncoming;

/// Why a certificate and key could not be served.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the certificate file holds no PEM certificate{0}")]
    Certificate(String),
    #[error("the key file holds no PEM private key: {0}")]
    Key(String),
    #[error("the key does not load, or is not the certificate's: {0}")]
    Pair(#[source] rustls::Error),
    #[error("TLS configuration: {0}")]
    Config(#[source] rustls::Error),
}

/// The certificate (chain) and key the node channel serves: fixed ([`Tls::from_pem`]) or the
/// current content of two files ([`Tls::from_files`]).
#[derive(Clone)]
pub struct Tls {
    inner: Arc<Inner>,
}

struct Inner {
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    files: Option<Files>,
}

struct Files {
    cert: PathBuf,
    key: PathBuf,
    /// Taken by one handshake at a time, so that a burst of connections reads the files once.
    seen: tokio::sync::Mutex<Seen>,
}

/// What the files looked like when last looked at, loaded or not: a bad pair is reported once,
/// not at every handshake.
struct Seen {
    stamps: Option<(Stamp, Stamp)>,
    /// The PEM of the pair being served, so that files rewritten with the same content change
    /// nothing.
    pem: (Vec<u8>, Vec<u8>),
}

/// What a `stat` tells of a file's content: a kubelet swap gives a new inode, an in-place
/// write a new modification time or length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: (u64, u64),
}

fn stamp(m: &Metadata) -> Stamp {
    #[cfg(unix)]
    let inode = {
        use std::os::unix::fs::MetadataExt;
        (m.dev(), m.ino())
    };
    #[cfg(not(unix))]
    let inode = (0, 0);
    Stamp {
        len: m.len(),
        modified: m.modified().ok(),
        inode,
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Certificate(format!(": {e}")))?;
    if chain.is_empty() {
        return Err(TlsError::Certificate(String::new()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Key(e.to_string()))?;
    CertifiedKey::from_der(chain, key, provider)
        .map(Arc::new)
        .map_err(TlsError::Pair)
}

/// A short, loggable name of a certificate: the start of its SHA-256 fingerprint.
fn fingerprint(key: &CertifiedKey) -> String {
    let Some(cert) = key.cert.first() else {
        return "none".to_owned();
    };
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
    digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

async fn read_async(path: &Path) -> Result<Vec<u8>, TlsError> {
    tokio::fs::read(path).await.map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

impl Tls {
    /// A fixed certificate (chain) and key, PEM.
    pub fn from_pem(cert: &[u8], key: &[u8]) -> Result<Tls, TlsError> {
        let provider = provider();
        let current = certified_key(cert, key, &provider)?;
        Ok(Tls {
            inner: Arc::new(Inner {
                provider,
                current: RwLock::new(current),
                files: None,
            }),
        })
    }

    /// The certificate (chain) and key in these PEM files, re-read when they change. They must
    /// load now: a broken start is reported at once rather than at the first handshake.
    pub fn from_files(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Result<Tls, TlsError> {
        let (cert, key) = (cert.into(), key.into());
        let metadata = |path: &Path| {
            std::fs::metadata(path).map_err(|source| TlsError::Read {
                path: path.to_owned(),
                source,
            })
        };
        // Stamped before reading: a change in between is seen (and loaded) at the next check.
        let stamps = (stamp(&metadata(&cert)?), stamp(&metadata(&key)?));
        let pem = (read(&cert)?, read(&key)?);
        let provider = provider();
        let current = certified_key(&pem.0, &pem.1, &provider)?;
        tracing::info!(
            cert = %cert.display(),
            fingerprint = %fingerprint(&current),
            "serving the node channel's certificate"
        );
        Ok(Tls {
            inner: Arc::new(Inner {
                provider,
                current: RwLock::new(current),
                files: Some(Files {
                    cert,
                    key,
                    seen: tokio::sync::Mutex::new(Seen {
                        stamps: Some(stamps),
                        pem,
                    }),
                }),
            }),
        })
    }

    fn current(&self) -> Arc<CertifiedKey> {
        self.inner.current.read().expect("certificate lock").clone()
    }

    /// Loads the files if they changed since they were last looked at (two `stat`s when they
    /// did not). Nothing to do for a fixed pair.
    pub async fn refresh(&self) {
        let Some(files) = &self.inner.files else {
            return;
        };
        let mut seen = files.seen.lock().await;
        let stamps = match (
            tokio::fs::metadata(&files.cert).await,
            tokio::fs::metadata(&files.key).await,
        ) {
            (Ok(cert), Ok(key)) => (stamp(&cert), stamp(&key)),
            (Err(e), _) | (_, Err(e)) => {
                if seen.stamps.take().is_some() {
                    tracing::warn!(
                        cert = %files.cert.display(),
                        key = %files.key.display(),
                        error = %e,
                        "the node channel's certificate files are gone: still serving the previous one"
                    );
                }
                return;
            }
        };
        if seen.stamps == Some(stamps) {
            return;
        }
        seen.stamps = Some(stamps);
        let pem = match (read_async(&files.cert).await, read_async(&files.key).await) {
            (Ok(cert), Ok(key)) => (cert, key),
            (Err(e), _) | (_, Err(e)) => {
                // Looked at again at the next handshake: the file may have been mid-swap.
                seen.stamps = None;
                tracing::warn!(
                    error = %e,
                    "the node channel's certificate did not load: still serving the previous one"
                );
                return;
            }
        };
        if pem == seen.pem {
            return;
        }
        match certified_key(&pem.0, &pem.1, &self.inner.provider) {
            Ok(new) => {
                let fingerprint = fingerprint(&new);
                *self.inner.current.write().expect("certificate lock") = new;
                seen.pem = pem;
                tracing::info!(
                    cert = %files.cert.display(),
                    %fingerprint,
                    "the node channel's certificate changed: new connections get it, open sessions go on"
                );
            }
            Err(e) => {
                tracing::warn!(
                    cert = %files.cert.display(),
                    key = %files.key.display(),
                    error = %e,
                    "the node channel's new certificate did not load: still serving the previous one"
                );
            }
        }
    }

    /// A rustls server configuration that serves whatever pair is current at each handshake,
    /// speaking HTTP/2 (gRPC clients insist on ALPN `h2`).
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let mut config = ServerConfig::builder_with_provider(self.inner.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(self.inner.clone())));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Tls");
        if let Some(files) = &self.inner.files {
            d.field("cert", &files.cert).field("key", &files.key);
        }
        d.field("fingerprint", &fingerprint(&self.current())).finish()
    }
}

struct Resolver(Arc<Inner>);

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolver").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current.read().expect("certificate lock").clone())
    }
}

/// The TLS connections of a listener. Each handshake runs in its own task, bounded by
/// `timeout`, so that a client that stalls holds up no one else; failed ones are dropped.
/// Dropping the stream closes the listener and abandons the handshakes under way.
pub struct TlsIncoming {
    tcp: Option<TcpIncoming>,
    tls: Tls,
    acceptor: TlsAcceptor,
    timeout: Duration,
    handshakes: JoinSet<Option<TlsStream<TcpStream>>>,
}

impl TlsIncoming {
    pub fn new(tcp: TcpIncoming, tls: Tls, timeout: Duration) -> Result<Self, TlsError> {
        let acceptor = TlsAcceptor::from(tls.server_config()?);
        Ok(TlsIncoming {
            tcp: Some(tcp),
            tls,
            acceptor,
            timeout,
            handshakes: JoinSet::new(),
        })
    }
}

async fn handshake(
    tls: Tls,
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    timeout: Duration,
) -> Option<TlsStream<TcpStream>> {
    let peer = tcp.peer_addr().ok();
    let accepted = tokio::time::timeout(timeout, async {
        tls.refresh().await;
        acceptor.accept(tcp).await
    })
    .await;
    match accepted {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(e)) => {
            tracing::debug!(?peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(?peer, ?timeout, "TLS handshake not finished in time");
            None
        }
    }
}

impl Stream for TlsIncoming {
    type Item = std::io::Result<TlsStream<TcpStream>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        while let Some(tcp) = this.tcp.as_mut() {
            match Pin::new(tcp).poll_next(cx) {
                Poll::Ready(Some(Ok(stream))) => {
                    this.handshakes.spawn(handshake(
                        this.tls.clone(),
                        this.acceptor.clone(),
                        stream,
                        this.timeout,
                    ));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => this.tcp = None,
                Poll::Pending => break,
            }
        }
        loop {
            match this.handshakes.poll_join_next(cx) {
                Poll::Ready(Some(Ok(Some(stream)))) => return Poll::Ready(Some(Ok(stream))),
                Poll::Ready(Some(_)) => continue,
                Poll::Ready(None) if this.tcp.is_none() => return Poll::Ready(None),
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}
