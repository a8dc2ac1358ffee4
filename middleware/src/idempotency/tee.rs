//! The response tee: the rest of a response body that was not ready at once streams to the client
//! frame by frame while a copy is kept for the store, from a task of its own that keeps reading
//! if the client goes away.

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::sync::mpsc;

use super::body::Streamed;
use super::held::Lease;
use crate::BoxError;
use crate::store::IdempotencyStore;
use crate::telemetry as m;

/// The rest of a response body that was not ready at once: teed to the client and the store.
pub(super) struct Stream<St: IdempotencyStore, B> {
    pub(super) lease: Lease<St>,
    pub(super) head: http::response::Parts,
    pub(super) body: std::pin::Pin<Box<B>>,
    pub(super) copy: Copy,
    /// Frames read before streaming began, not yet sent on.
    pub(super) ready: Vec<Streamed>,
    /// Whether the body already ended (normally) before streaming began.
    pub(super) ended: bool,
}

impl<St, B> Stream<St, B>
where
    St: IdempotencyStore,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    pub(super) async fn run(mut self, sender: mpsc::Sender<Streamed>) {
        let mut client = ClientStream {
            sender: Some(sender),
        };
        let renewal = self.lease.renewal();
        let end = tokio::select! {
            end = self.tee(&mut client) => end,
            never = renewal => match never {},
        };
        // The lease is settled (stored, released, or left to expire) and no longer renewed. Only
        // now does the client learn that the body is over: a client that has the whole body can
        // rely on its retry being a replay.
        client.send(end).await;
    }

    /// Forwards each frame as it arrives while keeping the copy, then stores or settles the
    /// lease; returns how the body ended, for the client.
    async fn tee(&mut self, client: &mut ClientStream) -> Streamed {
        for message in std::mem::take(&mut self.ready) {
            client.send(message).await;
        }
        while !self.ended {
            if !self.copy.storable {
                self.lease.release().await;
                if client.is_gone() {
                    // Nobody will read the rest and it will not be stored: stop reading it.
                    return Streamed::End;
                }
            }
            // The body's own error type need not be `Send`: convert it before any await.
            let next = self
                .body
                .frame()
                .await
                .map(|frame| frame.map_err(Into::into));
            match next {
                Some(Ok(frame)) => client.send(self.copy.keep(frame)).await,
                Some(Err(error)) => {
                    self.lease.outcome_unknown(&error);
                    return Streamed::Error(error);
                }
                None => self.ended = true,
            }
        }
        if self.copy.storable {
            let whole = self.copy.whole();
            self.lease.complete(&self.head, whole).await;
        } else {
            self.lease.release().await;
        }
        Streamed::End
    }
}
/// The copy of a response body kept for the store.
pub(super) struct Copy {
    chunks: Vec<Bytes>,
    len: usize,
    limit: usize,
    pub(super) storable: bool,
}

impl Copy {
    pub(super) fn new(limit: usize) -> Self {
        Self {
            chunks: Vec::new(),
            len: 0,
            limit,
            storable: true,
        }
    }

    /// Keeps a data frame's bytes (sharing, not copying, them) and returns the frame as a message
    /// for the client. Trailers make the response unstorable: a replay could not repeat them.
    pub(super) fn keep(&mut self, frame: Frame<Bytes>) -> Streamed {
        match frame.into_data() {
            Ok(data) => {
                if self.storable {
                    self.len += data.len();
                    if self.len > self.limit {
                        self.refuse(m::NotStored::TooLarge);
                    } else {
                        self.chunks.push(data.clone());
                    }
                }
                Streamed::Frame(Frame::data(data))
            }
            Err(frame) => {
                self.refuse(m::NotStored::Trailers);
                Streamed::Frame(frame)
            }
        }
    }

    fn refuse(&mut self, reason: m::NotStored) {
        if self.storable {
            m::not_stored(reason);
            self.storable = false;
            self.chunks = Vec::new();
        }
    }

    /// The body as one buffer: no copy when it came in one frame.
    pub(super) fn whole(&self) -> Bytes {
        match self.chunks.as_slice() {
            [] => Bytes::new(),
            [only] => only.clone(),
            chunks => {
                let mut whole = BytesMut::with_capacity(self.len);
                for chunk in chunks {
                    whole.extend_from_slice(chunk);
                }
                whole.freeze()
            }
        }
    }
}

/// The client's end of a streamed response: each frame goes on as it arrives; only the end of the
/// stream waits for the record (see [`Stream::run`]).
struct ClientStream {
    sender: Option<mpsc::Sender<Streamed>>,
}

impl ClientStream {
    async fn send(&mut self, message: Streamed) {
        if let Some(sender) = &self.sender
            && sender.send(message).await.is_err()
        {
            self.sender = None;
        }
    }

    fn is_gone(&self) -> bool {
        self.sender.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_shares_a_single_frame() {
        let mut copy = Copy::new(100);
        let data = Bytes::from_static(b"hello");
        copy.keep(Frame::data(data.clone()));
        assert_eq!(copy.whole().as_ptr(), data.as_ptr());
    }

    #[test]
    fn a_body_over_the_limit_is_not_storable() {
        let mut copy = Copy::new(4);
        copy.keep(Frame::data(Bytes::from_static(b"abc")));
        assert!(copy.storable);
        copy.keep(Frame::data(Bytes::from_static(b"de")));
        assert!(!copy.storable);
        assert!(copy.chunks.is_empty(), "an unstorable copy holds no memory");
    }

    #[test]
    fn trailers_make_a_response_unstorable() {
        let mut copy = Copy::new(100);
        copy.keep(Frame::trailers(http::HeaderMap::new()));
        assert!(!copy.storable);
    }
}
