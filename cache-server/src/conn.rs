//! What one client may hold of the server: a connection slot, and only for
//! as long as it keeps talking.
//!
//! [`serve`](crate::server::serve) gives every accepted connection a
//! permit of a semaphore sized by [`max_connections`] (connections beyond
//! it wait in the kernel's listen backlog, not in our file table), wraps its
//! socket in [`WatchedIo`] and its requests in [`Tracked`], and races it
//! against [`watchdog`]. The promises:
//!
//! - a connection with no request in flight that sends nothing for
//!   `header_read_timeout` is closed: a half-open connection, one that never
//!   finishes its TLS handshake or HTTP/2 preface, an idle keep-alive one
//!   (HTTP/1 additionally bounds the time to a complete request head, so
//!   trickling a byte at a time does not help);
//! - a request body that sends nothing for `body_read_timeout` fails the
//!   request ([`IdleBody`]), and a response the client stops reading for as
//!   long closes the connection;
//! - a request the server itself is still working on (a large lookup, a GC
//!   run) is never cut for being quiet.
//!
//! [`raise_nofile_limit`] lifts the soft open-file limit to the hard one at
//! start, so the limits above, not `EMFILE`, decide who is served.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body as AxumBody;
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use crate::config::ConnectionLimits;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a connection has done lately, shared by its socket wrapper, its
/// requests and its watchdog.
#[derive(Debug)]
pub struct Activity {
    epoch: Instant,
    /// Milliseconds since `epoch` of the last byte read or written.
    last_io: AtomicU64,
    /// 1 + milliseconds since `epoch` when a write started waiting for the
    /// client to read; 0 while no write waits.
    write_blocked: AtomicU64,
    /// Requests whose response has not been sent completely.
    in_flight: AtomicUsize,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Activity {
            epoch: Instant::now(),
            last_io: AtomicU64::new(0),
            write_blocked: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        })
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn touch(&self) {
        self.last_io.store(self.now(), Ordering::Relaxed);
    }

    fn write_waits(&self, waits: bool) {
        if !waits {
            self.write_blocked.store(0, Ordering::Relaxed);
        } else if self.write_blocked.load(Ordering::Relaxed) == 0 {
            self.write_blocked.store(self.now() + 1, Ordering::Relaxed);
        }
    }
}

/// Why [`watchdog`] gave up on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// Nothing in flight and nothing received for `header_read_timeout`.
    Idle,
    /// The client did not read the response for `body_read_timeout`.
    NotReading,
}

impl std::fmt::Display for Expired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Expired::Idle => "no complete request within the header read timeout",
            Expired::NotReading => "the client stopped reading the response",
        })
    }
}

/// Resolves when the connection has been quiet for longer than `limits`
/// allow; the caller then drops the connection.
pub async fn watchdog(activity: Arc<Activity>, limits: ConnectionLimits) -> Expired {
    let header = limits.header_read_timeout.as_millis() as u64;
    let body = limits.body_read_timeout.as_millis() as u64;
    loop {
        let now = activity.now();
        let mut next = now + 1000;
        if activity.in_flight.load(Ordering::Relaxed) == 0 {
            let deadline = activity.last_io.load(Ordering::Relaxed) + header;
            if deadline <= now {
                return Expired::Idle;
            }
            next = next.min(deadline);
        }
        let blocked = activity.write_blocked.load(Ordering::Relaxed);
        if blocked != 0 {
            let deadline = blocked - 1 + body;
            if deadline <= now {
                return Expired::NotReading;
            }
            next = next.min(deadline);
        }
        tokio::time::sleep(Duration::from_millis(next - now)).await;
    }
}

/// A socket (or TLS stream) that reports its progress to an [`Activity`].
pub struct WatchedIo<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> WatchedIo<T> {
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        activity.touch();
        WatchedIo { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WatchedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> WatchedIo<T> {
    fn note_write<R>(&self, polled: &Poll<io::Result<R>>, progressed: bool) {
        match polled {
            Poll::Pending => self.activity.write_waits(true),
            Poll::Ready(_) => {
                self.activity.write_waits(false);
                if progressed {
                    self.activity.touch();
                }
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WatchedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        let progressed = matches!(polled, Poll::Ready(Ok(n)) if n > 0);
        self.note_write(&polled, progressed);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        let progressed = matches!(polled, Poll::Ready(Ok(n)) if n > 0);
        self.note_write(&polled, progressed);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.note_write(&polled, false);
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Counts a request as in flight from its head until its response body is
/// sent (or dropped).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn enter(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        // The quiet time of an idle connection starts now.
        self.0.touch();
    }
}

/// The connection's service: the router, with every request body under
/// [`IdleBody`] and every request counted in flight.
#[derive(Clone)]
pub struct Tracked {
    router: axum::Router,
    activity: Arc<Activity>,
    body_read_timeout: Duration,
}

impl Tracked {
    pub fn new(router: axum::Router, activity: Arc<Activity>, limits: ConnectionLimits) -> Self {
        Tracked {
            router,
            activity,
            body_read_timeout: limits.body_read_timeout,
        }
    }
}

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = Response<AxumBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let guard = InFlight::enter(&self.activity);
        let timeout = self.body_read_timeout;
        let req = req.map(|body| AxumBody::new(IdleBody::new(body, timeout)));
        let response = tower::ServiceExt::oneshot(self.router.clone(), req);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| {
                AxumBody::new(Guarded {
                    inner: body,
                    _guard: guard,
                })
            }))
        })
    }
}

/// A response body that keeps its request in flight until it is dropped.
struct Guarded {
    inner: AxumBody,
    _guard: InFlight,
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The error a request body gives when the client paused too long.
#[derive(Debug, thiserror::Error)]
#[error("the client sent no request body data for {0:?}")]
pub struct BodyTimeout(pub Duration);

/// A request body that fails when no data arrives for `timeout`.
pub struct IdleBody<B> {
    inner: B,
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
    armed: bool,
}

impl<B> IdleBody<B> {
    pub fn new(inner: B, timeout: Duration) -> Self {
        IdleBody {
            inner,
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
            armed: false,
        }
    }
}

impl<B> Body for IdleBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                self.armed = false;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                if !self.armed {
                    let deadline = tokio::time::Instant::now() + self.timeout;
                    self.sleep.as_mut().reset(deadline);
                    self.armed = true;
                }
                match self.sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        self.armed = false;
                        Poll::Ready(Some(Err(BodyTimeout(self.timeout).into())))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the soft
/// limit in force afterwards.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct; lowering nothing.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = limit.rlim_max;
        } else {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}

/// Files kept for RocksDB, the content store and logs, whatever the load.
const RESERVED_FILES: u64 = 128;
/// The default never goes above this many connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// The connection limit: the configured one, else half of what the open-file
/// limit leaves after [`RESERVED_FILES`] (a connection may hold a blob file
/// open besides its socket), between 16 and [`DEFAULT_MAX_CONNECTIONS`].
pub fn max_connections(configured: Option<usize>, nofile: u64) -> usize {
    configured.unwrap_or_else(|| {
        let fit = nofile.saturating_sub(RESERVED_FILES) / 2;
        (fit as usize).clamp(16, DEFAULT_MAX_CONNECTIONS)
    })
}

/// How long the accept loop waits after a failed accept (`EMFILE`,
/// `ENFILE`, `ENOBUFS`): doubling from 10 ms up to one second, so a
/// persistent failure costs no CPU and a passing one little latency.
pub fn accept_backoff(previous: Option<Duration>) -> Duration {
    match previous {
        None => Duration::from_millis(10),
        Some(d) => (d * 2).min(Duration::from_secs(1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn default_connection_limit_follows_the_open_file_limit() {
        assert_eq!(max_connections(None, 1024), 448);
        assert_eq!(max_connections(None, 256), 64);
        assert_eq!(max_connections(None, 100), 16);
        assert_eq!(max_connections(None, 1 << 20), DEFAULT_MAX_CONNECTIONS);
        assert_eq!(max_connections(Some(7), 1 << 20), 7);
    }

    #[test]
    fn accept_backoff_doubles_up_to_a_second() {
        let mut d = None;
        let mut seen = Vec::new();
        for _ in 0..10 {
            let next = accept_backoff(d);
            seen.push(next.as_millis());
            d = Some(next);
        }
        assert_eq!(seen, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
    }

    #[tokio::test]
    async fn a_quiet_connection_expires_but_not_while_a_request_is_in_flight() {
        let limits = ConnectionLimits {
            header_read_timeout: Duration::from_millis(200),
            body_read_timeout: Duration::from_secs(60),
            max_connections: None,
        };
        let activity = Activity::new();
        let guard = InFlight::enter(&activity);
        let dog = tokio::spawn(watchdog(activity.clone(), limits));
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(!dog.is_finished(), "cut while the server was working");
        drop(guard);
        let started = Instant::now();
        assert_eq!(dog.await.unwrap(), Expired::Idle);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(150) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
    }

    #[tokio::test]
    async fn a_stalled_body_fails_after_the_body_timeout() {
        let (mut tx, rx) = futures::channel::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
        let body = IdleBody::new(
            http_body_util::StreamBody::new(rx),
            Duration::from_millis(200),
        );
        tx.try_send(Ok(Frame::data(Bytes::from_static(b"abc"))))
            .unwrap();
        let started = Instant::now();
        let err = body.collect().await.map(|c| c.to_bytes()).unwrap_err();
        assert!(err.is::<BodyTimeout>(), "{err}");
        assert!(started.elapsed() >= Duration::from_millis(200));
        drop(tx);
    }
}
