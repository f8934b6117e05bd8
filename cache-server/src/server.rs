//! Runs the service: opens the storage backend (the local store in `--data`,
//! or with `--storage s3://...` a replica over a shared bucket, see
//! [`crate::objstore`]), binds, serves the one router of [`crate::api`]
//! over it on HTTP/1.1 and HTTP/2 (h2c by prior knowledge, or ALPN over
//! TLS), runs GC in the background ([`crate::backend::gc_loop`]) and shuts
//! down gracefully.
//!
//! Shutdown is designed in: the future passed to [`serve`] stops the accept
//! loop; connections then get [`ServerConfig::shutdown_timeout`] to finish
//! their in-flight requests (idle keep-alive connections are closed at
//! once), the GC task stops, and the store is flushed before returning.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tracing::{error, info, warn};

use crate::api::{self, AppState};
use crate::auth::{Auth, AuthError};
use crate::backend::{LocalBackend, gc_loop};
use crate::config::ServerConfig;
use crate::objstore::{self, Storage};
use crate::store::{Store, StoreError};
use crate::telemetry;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("opening the store in {path}: {source}")]
    Store { path: String, source: StoreError },
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("writing port file {path}: {source}")]
    PortFile {
        path: String,
        source: std::io::Error,
    },
    #[error("flushing the store at shutdown: {0}")]
    Flush(StoreError),
    #[error("object storage: {0}")]
    Object(objstore::ObjError),
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => info!("SIGTERM received"),
                    _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the server");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The TLS acceptor: the server's certificate and key, and with a client
/// CA, a verifier that refuses clients without a certificate it signed.
fn load_tls(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<tokio_rustls::TlsAcceptor, ServerError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|e| ServerError::Tls(format!("reading {}: {e}", p.display())))
    };
    let cert_pem = read(cert)?;
    let key_pem = read(key)?;
    let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ServerError::Tls(format!("parsing {}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(ServerError::Tls(format!(
            "{} contains no PEM certificate",
            cert.display()
        )));
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| ServerError::Tls(format!("parsing {}: {e}", key.display())))?
        .ok_or_else(|| {
            ServerError::Tls(format!("{} contains no PEM private key", key.display()))
        })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let ca_pem = read(ca)?;
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_pemfile::certs(&mut ca_pem.as_slice()) {
                let c =
                    c.map_err(|e| ServerError::Tls(format!("parsing {}: {e}", ca.display())))?;
                roots.add(c).map_err(|e| {
                    ServerError::Tls(format!("{}: unusable CA certificate: {e}", ca.display()))
                })?;
            }
            if roots.is_empty() {
                return Err(ServerError::Tls(format!(
                    "{} contains no PEM certificate",
                    ca.display()
                )));
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| ServerError::Tls(format!("{}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Opens everything and serves until `shutdown` resolves.
pub async fn serve(
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let auth = match &config.tokens {
        Some(path) => {
            let auth = Auth::from_file(path)?;
            info!(tokens = %path.display(), "authentication required (tokens file loaded)");
            auth
        }
        None => {
            warn!(
                "no --tokens given: the cache is OPEN, anyone who can reach it may read, write and administer it"
            );
            Auth::Open
        }
    };
    let tls = match &config.tls {
        Some((cert, key)) => Some(load_tls(cert, key, config.tls_client_ca.as_deref())?),
        None => None,
    };
    // The storage backend: the local store in --data (the default), or a
    // replica over a bucket shared with other replicas (--storage s3://...).
    let storage = match &config.object {
        None => {
            let data = config.data.clone();
            let store_config = config.store.clone();
            let store = tokio::task::spawn_blocking(move || Store::open(&data, store_config))
                .await
                .map_err(|e| ServerError::Store {
                    path: config.data.display().to_string(),
                    source: StoreError::Corrupt(e.to_string()),
                })?
                .map_err(|source| ServerError::Store {
                    path: config.data.display().to_string(),
                    source,
                })?;
            Storage::Local(store)
        }
        Some(object) => Storage::Object(
            objstore::serve::open(object, &config.data)
                .await
                .map_err(ServerError::Object)?,
        ),
    };

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: config.listen,
        source,
    })?;
    if let Some(path) = &config.port_file {
        // Written via rename so a reader never sees a half-written file.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, format!("{}\n", local.port()))
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|source| ServerError::PortFile {
                path: path.display().to_string(),
                source,
            })?;
    }
    info!(
        data = %config.data.display(),
        max_size = ?config.store.max_size,
        storage = config.object.as_ref().map_or("local", |o| o.url.as_str()),
        tls = tls.is_some(),
        client_certificates = config.tls_client_ca.is_some(),
        "listening on {local}"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let (router, gc_task) = match &storage {
        Storage::Local(store) => {
            // Uploads that push the store over its size limit wake GC early.
            let gc_wakeup = Arc::new(Notify::new());
            let backend = Arc::new(LocalBackend::new(store.clone(), gc_wakeup.clone()));
            let state = Arc::new(AppState {
                backend: backend.clone(),
                auth,
                metrics: telemetry::metrics_handle(),
            });
            let gc_task = tokio::spawn(gc_loop(
                backend,
                config.gc_interval,
                Some(gc_wakeup),
                stop_rx,
            ));
            (api::router(state), gc_task)
        }
        Storage::Object(replica) => {
            objstore::serve::run(replica.clone(), auth, config.gc_interval, stop_rx)
        }
    };
    let service = TowerToHyperService::new(router);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Larger HTTP/2 windows: the defaults (64 KiB) cap a single blob stream
    // far below what the disk and loopback can do.
    builder
        .http2()
        .initial_stream_window_size(4u32 << 20)
        .initial_connection_window_size(8u32 << 20);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Typically EMFILE: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let watcher = graceful.watcher();
                let builder = builder.clone();
                let service = service.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let result = match tls {
                        Some(acceptor) => {
                            let handshake = tokio::time::timeout(
                                Duration::from_secs(10),
                                acceptor.accept(stream),
                            ).await;
                            match handshake {
                                Ok(Ok(tls_stream)) => {
                                    let conn = builder.serve_connection(TokioIo::new(tls_stream), service);
                                    watcher.watch(conn).await
                                }
                                Ok(Err(e)) => {
                                    warn!(%peer, error = %e, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    warn!(%peer, "TLS handshake timed out");
                                    return;
                                }
                            }
                        }
                        None => {
                            let conn = builder.serve_connection(TokioIo::new(stream), service);
                            watcher.watch(conn).await
                        }
                    };
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }

    drop(listener);
    info!(
        timeout = ?config.shutdown_timeout,
        "shutting down: no new connections, finishing in-flight requests"
    );
    tokio::select! {
        () = graceful.shutdown() => info!("all connections finished"),
        () = tokio::time::sleep(config.shutdown_timeout) => {
            warn!("shutdown deadline passed; abandoning the remaining connections");
        }
    }
    let _ = stop_tx.send(true);
    if let Err(e) = gc_task.await {
        error!(error = %e, "gc task failed");
    }
    if let Storage::Local(store) = storage {
        tokio::task::spawn_blocking(move || store.flush())
            .await
            .map_err(|e| ServerError::Flush(StoreError::Corrupt(e.to_string())))?
            .map_err(ServerError::Flush)?;
        info!("store flushed; bye");
    } else {
        // Everything acknowledged is in the bucket already.
        info!("bye");
    }
    Ok(())
}
