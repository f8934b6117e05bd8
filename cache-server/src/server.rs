//! Runs the service: opens the storage backend (the local store in `--data`,
//! or with `--storage s3://...` a replica over a shared bucket, see
//! [`crate::objstore`]), binds, serves the one router of [`crate::api`]
//! over it on HTTP/1.1 and HTTP/2 (h2c by prior knowledge, or ALPN over
//! TLS), runs GC in the background ([`crate::backend::gc_loop`]) and shuts
//! down gracefully.
//!
//! Every connection is held to [`crate::conn`]'s limits (a slot of
//! `--max-connections`, the header and body read timeouts), and a failing
//! accept backs off instead of spinning, so neither half-open connections
//! nor a full file table stop the service.
//!
//! Shutdown is designed in: the future passed to [`serve`] stops the accept
//! loop; connections then get [`ServerConfig::shutdown_timeout`] to finish
//! their in-flight requests (idle keep-alive connections are closed at
//! once), the GC task stops, and the store is flushed before returning.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, watch};
use tracing::{error, info, warn};

use crate::api::{self, AppState};
use crate::auth::{Auth, AuthError};
use crate::backend::{LocalBackend, gc_loop};
use crate::config::ServerConfig;
use crate::conn::{self, Activity, Tracked, WatchedIo};
use crate::objstore::{self, Storage};
use crate::telemetry;
use kiln_storage::{Store, StoreError};

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
    // The soft open-file limit is often 1024 while the hard one is far
    // higher; the connection limit, not EMFILE, should decide who is served.
    let nofile = match conn::raise_nofile_limit() {
        Ok(n) => n,
        Err(e) => {
            warn!(error = %e, "cannot read or raise the open-file limit; assuming 1024");
            1024
        }
    };
    let limits = config.limits;
    let max_connections = conn::max_connections(limits.max_connections, nofile);
    let slots = Arc::new(Semaphore::new(max_connections));

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
        max_connections,
        open_files = nofile,
        header_read_timeout = ?limits.header_read_timeout,
        body_read_timeout = ?limits.body_read_timeout,
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
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // HTTP/1: a complete request head within the header timeout of the
    // connection's start or its previous response (a byte-at-a-time head
    // does not extend it). The watchdog covers what hyper does not: the
    // preface sniffing of `auto`, HTTP/2, TLS, stalled responses.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    // Larger HTTP/2 windows: the defaults (64 KiB) cap a single blob stream
    // far below what the disk and loopback can do.
    builder
        .http2()
        .initial_stream_window_size(4u32 << 20)
        .initial_connection_window_size(8u32 << 20);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();

    tokio::pin!(shutdown);
    let mut backoff = None;
    loop {
        // A slot first: beyond the limit, connections wait in the listen
        // backlog and cost this process no file descriptor.
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => {
                backoff = None;
                pair
            }
            Err(e) => {
                // EMFILE and friends: retrying at once would spin on the
                // same error; wait, longer each time it repeats.
                let wait = conn::accept_backoff(backoff);
                backoff = Some(wait);
                warn!(error = %e, retry_in = ?wait, "accept failed");
                drop(permit);
                tokio::select! {
                    () = tokio::time::sleep(wait) => continue,
                    () = &mut shutdown => break,
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let router = router.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let activity = Activity::new();
            let service = Tracked::new(router, activity.clone(), limits);
            let io = WatchedIo::new(stream, activity.clone());
            let serve = async move {
                match tls {
                    Some(acceptor) => {
                        let handshake =
                            tokio::time::timeout(limits.header_read_timeout, acceptor.accept(io))
                                .await;
                        match handshake {
                            Ok(Ok(tls_stream)) => {
                                let conn =
                                    builder.serve_connection(TokioIo::new(tls_stream), service);
                                watcher.watch(conn).await
                            }
                            Ok(Err(e)) => {
                                warn!(%peer, error = %e, "TLS handshake failed");
                                Ok(())
                            }
                            Err(_) => {
                                warn!(%peer, "TLS handshake timed out");
                                Ok(())
                            }
                        }
                    }
                    None => {
                        let conn = builder.serve_connection(TokioIo::new(io), service);
                        watcher.watch(conn).await
                    }
                }
            };
            tokio::select! {
                result = serve => if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                },
                expired = conn::watchdog(activity, limits) => {
                    // Dropping the connection closes the socket.
                    tracing::debug!(%peer, "closing the connection: {expired}");
                }
            }
        });
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
