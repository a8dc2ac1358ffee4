//! The request and response bodies the layer hands on.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::sync::mpsc;

use crate::BoxError;

pin_project! {
    /// The request body the inner service receives: the buffered body of a covered request (read
    /// once for fingerprinting, handed on without another copy) or the untouched original.
    pub struct RequestBody<B> {
        #[pin]
        kind: RequestKind<B>,
    }
}

pin_project! {
    #[project = RequestKindProj]
    enum RequestKind<B> {
        Buffered { data: Option<Bytes> },
        Original { #[pin] body: B },
    }
}

impl<B> RequestBody<B> {
    pub(crate) fn buffered(data: Bytes) -> Self {
        Self {
            kind: RequestKind::Buffered {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    pub(crate) fn original(body: B) -> Self {
        Self {
            kind: RequestKind::Original { body },
        }
    }

    /// The buffered bytes, if the layer buffered this body.
    pub fn buffered_bytes(&self) -> Option<&Bytes> {
        match &self.kind {
            RequestKind::Buffered { data } => data.as_ref(),
            RequestKind::Original { .. } => None,
        }
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            RequestKindProj::Buffered { data } => Poll::Ready(data.take().map(Frame::data).map(Ok)),
            RequestKindProj::Original { body } => body.poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Buffered { data } => data.is_none(),
            RequestKind::Original { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Buffered { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |data| data.len() as u64))
            }
            RequestKind::Original { body } => body.size_hint(),
        }
    }
}

/// What the detached task that runs a leased request sends to the client's body.
#[derive(Debug)]
pub(crate) enum Streamed {
    Frame(Frame<Bytes>),
    Error(BoxError),
    /// The body ended normally. Without it, a closed channel means the task died mid-body and the
    /// client must see an error rather than a silently truncated body.
    End,
}

pin_project! {
    /// The response body the layer returns.
    pub struct ResponseBody<B> {
        #[pin]
        kind: ResponseKind<B>,
    }
}

pin_project! {
    #[project = ResponseKindProj]
    enum ResponseKind<B> {
        Inner { #[pin] body: B },
        Full { data: Option<Bytes> },
        Streamed { frames: mpsc::Receiver<Streamed>, size_hint: SizeHint, ended: bool },
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn inner(body: B) -> Self {
        Self {
            kind: ResponseKind::Inner { body },
        }
    }

    pub(crate) fn full(data: Bytes) -> Self {
        Self {
            kind: ResponseKind::Full {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    pub(crate) fn streamed(frames: mpsc::Receiver<Streamed>, size_hint: SizeHint) -> Self {
        Self {
            kind: ResponseKind::Streamed {
                frames,
                size_hint,
                ended: false,
            },
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            ResponseKindProj::Inner { body } => body.poll_frame(cx).map_err(Into::into),
            ResponseKindProj::Full { data } => Poll::Ready(data.take().map(Frame::data).map(Ok)),
            ResponseKindProj::Streamed { frames, ended, .. } => {
                if *ended {
                    return Poll::Ready(None);
                }
                match frames.poll_recv(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Some(Streamed::Frame(frame))) => Poll::Ready(Some(Ok(frame))),
                    Poll::Ready(Some(Streamed::Error(error))) => {
                        *ended = true;
                        Poll::Ready(Some(Err(error)))
                    }
                    Poll::Ready(Some(Streamed::End)) => {
                        *ended = true;
                        Poll::Ready(None)
                    }
                    Poll::Ready(None) => {
                        *ended = true;
                        Poll::Ready(Some(Err("the response stream was aborted".into())))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Inner { body } => body.is_end_stream(),
            ResponseKind::Full { data } => data.is_none(),
            ResponseKind::Streamed { ended, .. } => *ended,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Inner { body } => body.size_hint(),
            ResponseKind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |data| data.len() as u64))
            }
            ResponseKind::Streamed { size_hint, .. } => *size_hint,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};

    #[tokio::test]
    async fn a_stream_closed_without_its_end_marker_is_an_error() {
        let (sender, receiver) = mpsc::channel(4);
        sender
            .send(Streamed::Frame(Frame::data(Bytes::from_static(b"par"))))
            .await
            .unwrap();
        drop(sender);
        let body = ResponseBody::<Empty<Bytes>>::streamed(receiver, SizeHint::default());
        assert!(body.collect().await.is_err());
    }

    #[tokio::test]
    async fn a_stream_with_its_end_marker_is_complete() {
        let (sender, receiver) = mpsc::channel(4);
        sender
            .send(Streamed::Frame(Frame::data(Bytes::from_static(b"all"))))
            .await
            .unwrap();
        sender.send(Streamed::End).await.unwrap();
        let body = ResponseBody::<Empty<Bytes>>::streamed(receiver, SizeHint::default());
        assert_eq!(body.collect().await.unwrap().to_bytes(), "all");
    }
}
