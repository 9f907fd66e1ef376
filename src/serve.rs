//! `gitstate serve`: the backend as a plain local HTTP server over the same [`App::handle`]
//! the Lambda entry uses (HTTP/1.1 through hyper). Callers are authorized from the headers
//! before a body is read, and connections, body memory and every wait are bounded ([`ServeLimits`]).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body as _;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

use crate::app::App;
use crate::config::{AuthMode, ServeLimits};
use crate::error::Error;
use crate::protocol::ProtocolError;

/// Body memory is reserved in units of this many bytes (a semaphore counts permits in `u32`s).
const MEMORY_UNIT: usize = 1024;
/// Largest request head (request line and headers) a connection may buffer; hyper's floor is 8 KiB.
const MAX_HEAD_BYTES: usize = 64 << 10;
/// First pause after a failed `accept`; it doubles while `accept` keeps failing.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one "accept failed" log line per this interval; the others are counted.
const ACCEPT_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Bind `addr`, print the backend block to paste, and serve until the process ends.
pub async fn listen(app: Arc<App>, addr: SocketAddr) -> io::Result<()> {
    let limits = app.config().serve_limits.clone();
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    if let Some(warning) = exposure_warning(&app, local) {
        eprintln!("{warning}");
    }
    println!("{}", banner(&app, local));
    serve(app, listener, limits).await
}

/// The accept loop of [`listen`] on a bound listener.
pub async fn serve(app: Arc<App>, listener: TcpListener, limits: ServeLimits) -> io::Result<()> {
    let shared = Arc::new(Shared::new(app, &limits));
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let mut failures = AcceptFailures::default();
    loop {
        // Wait for a free slot before accepting: while all are taken, connections wait in the backlog.
        let slot = Arc::clone(&connections).acquire_owned().await.expect("the semaphore is never closed");
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                failures.recovered();
                stream
            }
            Err(e) => {
                // Out of descriptors (EMFILE) the listener stays readable and accept fails at once:
                // without a pause this loop would spin and flood the log.
                tokio::time::sleep(failures.failed(&e)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let _slot: OwnedSemaphorePermit = slot;
            let (header_read_timeout, write_timeout) = (shared.limits.header_read_timeout, shared.limits.write_timeout);
            let service = service_fn(move |req| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(respond(&shared, req).await) }
            });
            let io = TokioIo::new(WriteStall::new(stream, write_timeout));
            let result = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .max_buf_size(MAX_HEAD_BYTES)
                .serve_connection(io, service)
                .await;
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
}

/// What every connection of one server shares.
struct Shared {
    app: Arc<App>,
    limits: ServeLimits,
    /// Body memory in [`MEMORY_UNIT`]s; see [`ServeLimits::body_memory_bytes`].
    body_memory: Arc<Semaphore>,
    /// Units one body may reserve at most (the body limit, within the whole budget).
    max_body_units: u32,
}

impl Shared {
    fn new(app: Arc<App>, limits: &ServeLimits) -> Self {
        let max_body = app.config().max_body_bytes;
        // A budget below one maximal body would refuse bodies the limit allows.
        let budget_units = units(limits.body_memory_bytes.max(max_body)).min(Semaphore::MAX_PERMITS as u64);
        let max_body_units = units(max_body).min(budget_units).min(u32::MAX as u64) as u32;
        Shared {
            app,
            limits: limits.clone(),
            body_memory: Arc::new(Semaphore::new(budget_units as usize)),
            max_body_units,
        }
    }
}

fn units(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(MEMORY_UNIT as u64)
}

async fn respond(shared: &Shared, req: http::Request<hyper::body::Incoming>) -> http::Response<Full<Bytes>> {
    let app = &shared.app;
    let limit = app.config().max_body_bytes;
    let (parts, body) = req.into_parts();
    // A refused caller's body is never read: answer from the headers, then close (hyper drops
    // what is left unread), so sending a huge body without credentials costs nothing.
    if let Some(refusal) = app.refuse_unauthorized(&parts.headers) {
        refused_early(&parts, &refusal);
        return finish(refusal, !body.is_end_stream());
    }
    if body.is_end_stream() {
        return finish(app.handle(http::Request::from_parts(parts, Bytes::new())).await, false);
    }
    // A declared length above the limit is refused before a byte of it is read.
    let declared = body.size_hint().exact();
    if declared.is_some_and(|n| n > limit as u64) {
        let refusal = Error::from(ProtocolError::PayloadTooLarge { limit }).into_response();
        refused_early(&parts, &refusal);
        return finish(refusal, true);
    }
    let deadline = tokio::time::Instant::now() + shared.limits.body_read_timeout;
    let wanted = declared.map_or(shared.max_body_units, |n| units(n as usize).min(shared.max_body_units as u64) as u32);
    let memory = Arc::clone(&shared.body_memory).acquire_many_owned(wanted);
    let _reserved = match tokio::time::timeout_at(deadline, memory).await {
        Ok(permit) => permit.expect("the semaphore is never closed"),
        Err(_) => {
            tracing::warn!("body memory stayed in use by other requests; answered 503");
            return finish(Error::BodyMemoryBusy.into_response(), true);
        }
    };
    // The reservation is held until the answer is built: the body lives that long.
    let collected = match tokio::time::timeout_at(deadline, Limited::new(body, limit).collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            return finish(Error::from(ProtocolError::PayloadTooLarge { limit }).into_response(), true);
        }
        Ok(Err(e)) => {
            let e = Error::from(ProtocolError::BadRequest(format!("could not read the request body: {e}")));
            return finish(e.into_response(), true);
        }
        Err(_) => {
            tracing::info!(
                timeout_s = shared.limits.body_read_timeout.as_secs_f64(),
                "request body too slow; answered 408"
            );
            let seconds = shared.limits.body_read_timeout.as_secs_f64();
            return finish(Error::BodyTooSlow { seconds }.into_response(), true);
        }
    };
    finish(app.handle(http::Request::from_parts(parts, collected)).await, false)
}

/// The log line [`App::handle`] would have written for a request answered before its body.
fn refused_early(parts: &http::request::Parts, response: &http::Response<Bytes>) {
    tracing::info!(
        method = %parts.method.as_str().escape_debug(),
        status = response.status().as_u16(),
        "request refused before its body was read"
    );
}

/// `close`: part of the body was left unread, so the connection cannot carry another request;
/// say so instead of letting the client find out by a reset.
fn finish(mut response: http::Response<Bytes>, close: bool) -> http::Response<Full<Bytes>> {
    if close {
        response.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    }
    response.map(Full::new)
}

/// Backoff and log rate limit of a failing `accept`.
#[derive(Default)]
struct AcceptFailures {
    backoff: Option<Duration>,
    last_log: Option<Instant>,
    suppressed: u64,
}

impl AcceptFailures {
    /// Log (at most once per [`ACCEPT_LOG_INTERVAL`]) and return how long to pause.
    fn failed(&mut self, e: &io::Error) -> Duration {
        let backoff = self.backoff.map_or(ACCEPT_BACKOFF_MIN, |b| (b * 2).min(ACCEPT_BACKOFF_MAX));
        self.backoff = Some(backoff);
        let now = Instant::now();
        if self.last_log.is_none_or(|t| now.duration_since(t) >= ACCEPT_LOG_INTERVAL) {
            tracing::warn!(
                error = %e,
                retry_in_ms = backoff.as_millis() as u64,
                suppressed = self.suppressed,
                "accept failed (at most one such line per second; `suppressed` counts the others)"
            );
            self.last_log = Some(now);
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
        backoff
    }

    fn recovered(&mut self) {
        if self.backoff.take().is_some() && self.suppressed > 0 {
            tracing::warn!(suppressed = self.suppressed, "accept works again");
        }
        self.suppressed = 0;
    }
}

/// A stream whose writes fail once they have made no progress for `limit`: a client that
/// stops reading its answer would otherwise hold the connection and the answer's memory.
struct WriteStall {
    inner: TcpStream,
    limit: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl WriteStall {
    fn new(inner: TcpStream, limit: Duration) -> Self {
        WriteStall { inner, limit, stalled: None }
    }

    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let limit = self.limit;
        let timer = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading the answer")))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for WriteStall {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteStall {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, poll)
    }
}

/// The start-up warning for a server anyone on the network may reach without credentials.
pub fn exposure_warning(app: &App, local: SocketAddr) -> Option<String> {
    let config = app.config();
    // `secret` mode may take its backend credentials from the secret, and refuses to start without.
    let backend_auth = config.backend_credentials.is_some() || config.auth == AuthMode::Secret;
    if local.ip().to_canonical().is_loopback() || backend_auth {
        return None;
    }
    Some(format!(
        "gitstate: WARNING: listening on {local}, which is not a loopback address, and this backend has no \
         basic auth of its own (GITSTATE_USERNAME/GITSTATE_PASSWORD are not set): anyone who can reach \
         this address can read and write states{}",
        match (config.auth, &config.repository) {
            (AuthMode::Passthrough, Some(_)) => {
                ", as far as the git host lets the credentials they send (or none) reach them"
            }
            _ => "",
        }
    ))
}

/// The start-up text: where states go and the block a Terraform user pastes.
pub fn banner(app: &App, local: SocketAddr) -> String {
    let base = format!("http://{local}");
    format!(
        "gitstate listening on {base}, storing states in {storage} (branch {branch})\n\
         Paste this into your Terraform configuration:\n\n\
         terraform {{\n  backend \"http\" {{\n    \
         address        = \"{base}/state/terraform.tfstate\"\n    \
         lock_address   = \"{base}/state/terraform.tfstate\"\n    \
         unlock_address = \"{base}/state/terraform.tfstate\"\n  }}\n}}\n\n\
         The web view: {base}/ui/\n",
        storage = app.describe_storage(),
        branch = app.config().branch,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_failures_back_off_and_log_once_per_second() {
        let mut f = AcceptFailures::default();
        let e = io::Error::from_raw_os_error(24);
        let pauses: Vec<Duration> = (0..10).map(|_| f.failed(&e)).collect();
        assert_eq!(pauses[0], ACCEPT_BACKOFF_MIN);
        assert!(pauses.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*pauses.last().unwrap(), ACCEPT_BACKOFF_MAX);
        // One line logged, nine counted.
        assert_eq!(f.suppressed, 9);
        f.recovered();
        assert_eq!((f.backoff, f.suppressed), (None, 0));
        assert_eq!(f.failed(&e), ACCEPT_BACKOFF_MIN);
    }
}
