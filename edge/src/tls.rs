//! TLS for the protocol v2 transports (`[v2] tls_listen`, `wss_listen`): the rustls server
//! configuration built from the PEM files of `tls_cert_file` and `tls_key_file` (ring provider,
//! TLS 1.2 and 1.3, no client certificates, session resumption by stateless tickets only, with
//! `tls_session_tickets`), and its reload on SIGHUP.
//!
//! [`TlsCerts`] is shared by the main thread and the shards. The main thread reads the files and
//! publishes a new `Arc<ServerConfig>` under a lock held only for a pointer swap, then raises a
//! generation counter; a shard compares the generation at each accept with the one it cached and
//! takes the lock only when it changed ([`ShardCerts::current`]). A handshake uses the
//! configuration current when the connection was accepted; an established connection keeps the
//! one it was made with. A reload that fails (file missing, bad PEM, key not matching) keeps the
//! previous certificate, logs an error and is counted.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why a certificate or key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a PEM certificate chain: {detail}")]
    BadCert { path: PathBuf, detail: String },
    #[error("{path}: no PEM private key (PKCS#8, PKCS#1 or SEC1): {detail}")]
    BadKey { path: PathBuf, detail: String },
    #[error("certificate {cert} and key {key} cannot serve: {source}")]
    Config {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
}

/// Reads the PEM certificate chain and private key and builds the server configuration.
/// Blocking (file reads): call it on the main thread, never on a shard.
pub fn load_server_config(cert: &Path, key: &Path) -> Result<ServerConfig, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let cert_pem = read(cert)?;
    let key_pem = read(key)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::BadCert {
            path: cert.to_owned(),
            detail: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::BadCert {
            path: cert.to_owned(),
            detail: "no CERTIFICATE block".to_owned(),
        });
    }
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::BadKey {
        path: key.to_owned(),
        detail: e.to_string(),
    })?;
    let config_err = |source| TlsError::Config {
        cert: cert.to_owned(),
        key: key.to_owned(),
        source,
    };
    // The ring provider (rustls 0.23.48 deprecates it for lacking post-quantum key exchange):
    // chosen to avoid building aws-lc; X25519 and the NIST curves, TLS 1.2 and 1.3.
    // Key exchange groups in the usual order, X25519 first (ring's default list starts with
    // P-384). A rustls server takes the client's first supported group, so the client decides:
    // P-384 costs the edge about 1.3 ms of CPU per handshake, X25519 about 0.35 ms
    // (BENCHMARKS.md, "v2 transports").
    #[allow(deprecated)]
    let provider = {
        use rustls::crypto::ring::kx_group;
        let mut p = rustls::crypto::ring::default_provider();
        p.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1];
        Arc::new(p)
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(config_err)?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(config_err)?;
    // No stateful session cache (rustls's default holds 256 sessions behind one lock, shared by
    // every shard): resumption is by stateless tickets only (`TlsCerts::load`).
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(config)
}

/// `config` issuing and accepting tickets sealed by a new key of its own (one ticket per full
/// handshake: a client uses a ticket once, and each resumption brings a new one), or, without
/// `session_tickets`, none at all.
fn with_tickets(
    mut config: ServerConfig,
    session_tickets: bool,
    cert: &Path,
    key: &Path,
) -> Result<ServerConfig, TlsError> {
    if session_tickets {
        config.ticketer =
            rustls::crypto::ring::Ticketer::new().map_err(|source| TlsError::Config {
                cert: cert.to_owned(),
                key: key.to_owned(),
                source,
            })?;
        config.send_tls13_tickets = 1;
    } else {
        config.send_tls13_tickets = 0;
    }
    Ok(config)
}

/// The current TLS server configuration, replaced by [`TlsCerts::reload`].
pub struct TlsCerts {
    cert_file: PathBuf,
    key_file: PathBuf,
    /// `tls_session_tickets`: each configuration gets its own ticket key, so a reload also ends
    /// the resumption of sessions made with the old certificate.
    session_tickets: bool,
    current: RwLock<Arc<ServerConfig>>,
    /// Raised after each successful reload.
    generation: AtomicU64,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
}

impl std::fmt::Debug for TlsCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsCerts")
            .field("cert_file", &self.cert_file)
            .field("generation", &self.generation.load(Ordering::Relaxed))
            .finish()
    }
}

impl TlsCerts {
    /// Loads the files once (main thread); with `session_tickets`, handshakes issue and accept
    /// stateless session tickets.
    pub fn load(
        cert_file: &Path,
        key_file: &Path,
        session_tickets: bool,
    ) -> Result<Self, TlsError> {
        let config = with_tickets(
            load_server_config(cert_file, key_file)?,
            session_tickets,
            cert_file,
            key_file,
        )?;
        Ok(Self {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            session_tickets,
            current: RwLock::new(Arc::new(config)),
            generation: AtomicU64::new(0),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
        })
    }

    /// Reads the files again and publishes the new configuration; on failure keeps the old one,
    /// logs and counts it. Blocking (file reads): main thread only.
    pub fn reload(&self) -> Result<(), TlsError> {
        let loaded = load_server_config(&self.cert_file, &self.key_file).and_then(|config| {
            with_tickets(
                config,
                self.session_tickets,
                &self.cert_file,
                &self.key_file,
            )
        });
        match loaded {
            Ok(config) => {
                let config = Arc::new(config);
                match self.current.write() {
                    Ok(mut g) => *g = config,
                    Err(poisoned) => *poisoned.into_inner() = config,
                }
                self.generation.fetch_add(1, Ordering::Release);
                self.reloads_ok.fetch_add(1, Ordering::Relaxed);
                tracing::info!(cert = %self.cert_file.display(), "tls certificate reloaded");
                Ok(())
            }
            Err(e) => {
                self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    error = %e,
                    "tls certificate reload failed; keeping the previous one"
                );
                Err(e)
            }
        }
    }

    /// Successful and failed reloads so far.
    pub fn reload_counts(&self) -> (u64, u64) {
        (
            self.reloads_ok.load(Ordering::Relaxed),
            self.reloads_failed.load(Ordering::Relaxed),
        )
    }

    fn snapshot(&self) -> (u64, Arc<ServerConfig>) {
        // The generation is read before the configuration: at worst a shard sees the new
        // configuration with the old generation and takes it again at its next accept.
        let generation = self.generation.load(Ordering::Acquire);
        let config = match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        (generation, config)
    }
}

/// A shard's cached view of [`TlsCerts`]: the shared lock is taken only after a reload.
#[derive(Debug)]
pub struct ShardCerts {
    shared: Arc<TlsCerts>,
    cached: std::cell::RefCell<(u64, Arc<ServerConfig>)>,
}

impl ShardCerts {
    pub fn new(shared: Arc<TlsCerts>) -> Self {
        let cached = std::cell::RefCell::new(shared.snapshot());
        Self { shared, cached }
    }

    /// The configuration a new handshake uses.
    pub fn current(&self) -> Arc<ServerConfig> {
        let generation = self.shared.generation.load(Ordering::Acquire);
        let mut cached = self.cached.borrow_mut();
        if cached.0 != generation {
            *cached = self.shared.snapshot();
        }
        cached.1.clone()
    }
}

/// Writes a new self-signed certificate for `localhost` and its key as `dir/NAME.crt` and
/// `dir/NAME.key` (the tests of this module and of the transports).
#[cfg(test)]
pub(crate) fn write_cert(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert, c.cert.pem()).unwrap();
    std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_pem_and_refuses_missing_or_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_cert(dir.path(), "a");
        load_server_config(&cert, &key).unwrap();
        let missing = load_server_config(&dir.path().join("none.crt"), &key).unwrap_err();
        assert!(matches!(missing, TlsError::Read { .. }), "{missing}");
        assert!(missing.to_string().contains("none.crt"));
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not pem at all").unwrap();
        let e = load_server_config(&junk, &key).unwrap_err();
        assert!(matches!(e, TlsError::BadCert { .. }), "{e}");
        let e = load_server_config(&cert, &junk).unwrap_err();
        assert!(matches!(e, TlsError::BadKey { .. }), "{e}");
        // A key of another certificate.
        let (_, other_key) = write_cert(dir.path(), "b");
        let e = load_server_config(&cert, &other_key).unwrap_err();
        assert!(matches!(e, TlsError::Config { .. }), "{e}");
    }

    #[test]
    fn a_failed_reload_keeps_the_old_config_and_shards_see_a_good_one() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_cert(dir.path(), "a");
        let certs = Arc::new(TlsCerts::load(&cert, &key, true).unwrap());
        let shard = ShardCerts::new(certs.clone());
        let first = shard.current();
        std::fs::write(&cert, "broken").unwrap();
        assert!(certs.reload().is_err());
        assert!(Arc::ptr_eq(&first, &shard.current()), "old config kept");
        write_cert(dir.path(), "a");
        certs.reload().unwrap();
        assert!(!Arc::ptr_eq(&first, &shard.current()), "new config taken");
        assert_eq!(certs.reload_counts(), (1, 1));
    }
}
