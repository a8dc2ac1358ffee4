//! Connections to the one upstream: a pool of hyper `SendRequest` handles.
//!
//! The proxy talks to a single upstream, so the pool needs no keyed map (hyper-util's legacy
//! client hashes the upstream's address on every checkout and return) and no hand-off task per
//! request: a request is written by the caller's task into the connection's task, once.
//!
//! * HTTP/1.1: idle connections wait in a stack (most recent first, so that cold ones age out);
//!   a connection goes back when its response body has been read to the end, at most `max_idle`
//!   of them, and idle ones older than `idle_timeout` are closed by a reaper.
//! * HTTP/2 (h2c, `upstream_http2`): one multiplexed connection shared by every request,
//!   replaced when it closes, dropped when unused for `idle_timeout`.
//!
//! A pooled connection the upstream closed meanwhile is detected without risk: hyper hands the
//! request back when it was certainly not written (`try_send_request`), and only then is it sent
//! again on another connection.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http1, http2};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tower::Service;
use tower_idempotency::BoxError;

/// Where and how to connect.
pub struct PoolSettings {
    /// The upstream URL (only its scheme, host and port are dialled).
    pub upstream: Uri,
    /// Longest wait for a TCP connection.
    pub connect_timeout: Duration,
    /// How long an unused connection stays open.
    pub idle_timeout: Duration,
    /// Most idle HTTP/1.1 connections kept; 0 keeps none (and shares no HTTP/2 connection).
    pub max_idle: usize,
    /// h2c with prior knowledge instead of HTTP/1.1.
    pub http2: bool,
}

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made (or its handshake failed), or the connection closed before
    /// the request was written: the upstream never saw the request.
    #[error("connect error: {0}")]
    NotSent(#[source] BoxError),
    /// The connection failed after the request may have been written: the upstream may have
    /// acted on it.
    #[error(transparent)]
    MaybeSent(hyper::Error),
}

impl SendError {
    /// Whether the upstream certainly never saw the request.
    pub fn is_not_sent(&self) -> bool {
        matches!(self, Self::NotSent(_))
    }
}

/// A pool of connections to the upstream; cheap to share behind an `Arc`.
pub struct Pool<B> {
    shared: Arc<Shared<B>>,
}

struct Shared<B> {
    connector: HttpConnector,
    upstream: Uri,
    idle_timeout: Duration,
    max_idle: usize,
    http2: bool,
    /// Idle HTTP/1.1 connections, the most recently used last.
    idle: Mutex<Vec<Idle<B>>>,
    /// The shared HTTP/2 connection and when it was last used.
    multiplexed: Mutex<Option<(http2::SendRequest<B>, Instant)>>,
    /// Held while a new HTTP/2 connection is made, so that concurrent requests share it.
    connecting: tokio::sync::Mutex<()>,
}

struct Idle<B> {
    sender: http1::SendRequest<B>,
    since: Instant,
}

impl<B> Pool<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    /// A pool with no connection yet; must be called within a tokio runtime (the reaper).
    pub fn new(settings: PoolSettings) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(settings.connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let shared = Arc::new(Shared {
            connector,
            upstream: settings.upstream,
            idle_timeout: settings.idle_timeout,
            max_idle: settings.max_idle,
            http2: settings.http2,
            idle: Mutex::new(Vec::new()),
            multiplexed: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(reap(Arc::downgrade(&shared)));
        }
        Self { shared }
    }

    /// Sends `request` (its URI in origin form for HTTP/1.1, absolute for HTTP/2) and returns the
    /// response head; the body gives the connection back to the pool when read to the end.
    pub async fn send(&self, request: Request<B>) -> Result<Response<PooledBody<B>>, SendError> {
        if self.shared.http2 {
            return self.send_http2(request).await;
        }
        let mut request = request;
        while let Some(mut sender) = self.shared.checkout() {
            if sender.ready().await.is_err() {
                continue; // closed while idle; nothing was sent
            }
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(self.shared.clone().give_back_after(response, sender)),
                Err(error) => request = resend_or_fail(error)?,
            }
        }
        let mut sender = self.shared.connect_http1().await?;
        match sender.try_send_request(request).await {
            Ok(response) => Ok(self.shared.clone().give_back_after(response, sender)),
            Err(error) => Err(fresh_connection_failed(error)),
        }
    }

    async fn send_http2(&self, request: Request<B>) -> Result<Response<PooledBody<B>>, SendError> {
        let mut request = request;
        if let Some(mut sender) = self.shared.multiplexed() {
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(response.map(PooledBody::unpooled)),
                Err(error) => request = resend_or_fail(error)?,
            }
        }
        let mut sender = self.shared.connect_http2().await?;
        match sender.try_send_request(request).await {
            Ok(response) => Ok(response.map(PooledBody::unpooled)),
            Err(error) => Err(fresh_connection_failed(error)),
        }
    }
}

/// A request hyper handed back was never written: it may go on another connection.
fn resend_or_fail<B>(mut error: TrySendError<Request<B>>) -> Result<Request<B>, SendError> {
    match error.take_message() {
        Some(request) => {
            tracing::debug!(error = %error.error(), "pooled connection closed; sending on another");
            Ok(request)
        }
        None => Err(SendError::MaybeSent(error.into_error())),
    }
}

fn fresh_connection_failed<B>(mut error: TrySendError<Request<B>>) -> SendError {
    if error.take_message().is_some() {
        SendError::NotSent(error.into_error().into())
    } else {
        SendError::MaybeSent(error.into_error())
    }
}

impl<B> Shared<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    fn checkout(&self) -> Option<http1::SendRequest<B>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(Idle { sender, since }) = idle.pop() {
            if !sender.is_closed() && since.elapsed() < self.idle_timeout {
                return Some(sender);
            }
        }
        None
    }

    fn give_back(&self, sender: http1::SendRequest<B>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.max_idle {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// The response, whose body returns `sender` to the pool once read to the end. A switch of
    /// protocols takes the connection for good.
    fn give_back_after(
        self: Arc<Self>,
        response: Response<Incoming>,
        sender: http1::SendRequest<B>,
    ) -> Response<PooledBody<B>> {
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            return response.map(PooledBody::unpooled);
        }
        if response.body().is_end_stream() {
            self.give_back(sender);
            return response.map(PooledBody::unpooled);
        }
        response.map(|body| PooledBody {
            body,
            returning: Some((self, sender)),
        })
    }

    async fn dial(&self) -> Result<TokioIo<tokio::net::TcpStream>, SendError> {
        let mut connector = self.connector.clone();
        connector
            .call(self.upstream.clone())
            .await
            .map_err(|error| SendError::NotSent(error.into()))
    }

    async fn connect_http1(&self) -> Result<http1::SendRequest<B>, SendError> {
        let io = self.dial().await?;
        let (sender, connection) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|error| SendError::NotSent(error.into()))?;
        tokio::spawn(async move {
            // With upgrades: a 101 answer hands the connection to the WebSocket tunnel.
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%error, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    fn multiplexed(&self) -> Option<http2::SendRequest<B>> {
        let mut shared = self
            .multiplexed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match shared.as_mut() {
            Some((sender, last_used))
                if !sender.is_closed() && last_used.elapsed() < self.idle_timeout =>
            {
                *last_used = Instant::now();
                Some(sender.clone())
            }
            _ => {
                *shared = None;
                None
            }
        }
    }

    async fn connect_http2(&self) -> Result<http2::SendRequest<B>, SendError> {
        let _connecting = self.connecting.lock().await;
        // Another request may have connected while this one waited.
        if self.max_idle > 0
            && let Some(sender) = self.multiplexed()
        {
            return Ok(sender);
        }
        let io = self.dial().await?;
        let (mut sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await
            .map_err(|error| SendError::NotSent(error.into()))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "upstream connection ended with an error");
            }
        });
        sender
            .ready()
            .await
            .map_err(|error| SendError::NotSent(error.into()))?;
        if self.max_idle > 0 {
            *self
                .multiplexed
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some((sender.clone(), Instant::now()));
        }
        Ok(sender)
    }

    fn expire_idle(&self) {
        let timeout = self.idle_timeout;
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|idle| !idle.sender.is_closed() && idle.since.elapsed() < timeout);
        let mut shared = self
            .multiplexed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if shared
            .as_ref()
            .is_some_and(|(sender, last_used)| sender.is_closed() || last_used.elapsed() >= timeout)
        {
            *shared = None;
        }
    }
}

/// Closes connections idle longer than `idle_timeout` (dropping the last handle of a connection
/// ends its task), until the pool is gone.
async fn reap<B>(shared: Weak<Shared<B>>)
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let period = match shared.upgrade() {
        Some(shared) => (shared.idle_timeout / 2).max(Duration::from_millis(100)),
        None => return,
    };
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match shared.upgrade() {
            Some(shared) => shared.expire_idle(),
            None => return,
        }
    }
}

/// A response body from the pool: once read to the end, its HTTP/1.1 connection is free for the
/// next request. Dropped before the end, the connection is not reused (hyper closes it).
pub struct PooledBody<B> {
    body: Incoming,
    returning: Option<(Arc<Shared<B>>, http1::SendRequest<B>)>,
}

impl<B> PooledBody<B> {
    fn unpooled(body: Incoming) -> Self {
        Self {
            body,
            returning: None,
        }
    }
}

impl<B> Body for PooledBody<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        let finished = match &frame {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => this.body.is_end_stream(),
            _ => false,
        };
        if finished && let Some((shared, sender)) = this.returning.take() {
            shared.give_back(sender);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
