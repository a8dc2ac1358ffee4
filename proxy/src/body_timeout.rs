//! An idle timeout between the frames of the upstream's response body.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tower_idempotency::{BodyTimeout, BoxError};

/// A body that fails with [`BodyTimeout`] when its next frame takes longer than `timeout` to
/// arrive. The clock runs only while the body is being read, so a slow client (which stops the
/// reading) never makes the upstream look stalled.
pub struct IdleTimeout<B> {
    inner: B,
    timeout: Duration,
    /// Armed when a read starts waiting; disarmed when a frame arrives.
    deadline: Option<Pin<Box<Sleep>>>,
    failed: bool,
}

impl<B> IdleTimeout<B> {
    /// `inner`, failing after `timeout` without a frame.
    pub fn new(inner: B, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            deadline: None,
            failed: false,
        }
    }
}

impl<B> Body for IdleTimeout<B>
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
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.deadline = None;
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        let timeout = this.timeout;
        let deadline = this
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(Instant::now() + timeout)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => {
                this.deadline = None;
                this.failed = true;
                Poll::Ready(Some(Err(BodyTimeout(timeout).into())))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    #[tokio::test]
    async fn a_stalled_body_fails_with_body_timeout_and_a_flowing_one_does_not() {
        let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let frames = futures_util::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|frame| (frame, receiver))
        });
        let mut body = IdleTimeout::new(
            StreamBody::new(Box::pin(frames)),
            Duration::from_millis(100),
        );
        sender
            .send(Ok(Frame::data(Bytes::from("a"))))
            .await
            .unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Time spent not reading does not count.
        sender
            .send(Ok(Frame::data(Bytes::from("b"))))
            .await
            .unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        let error = body.frame().await.unwrap().unwrap_err();
        assert!(BodyTimeout::is_in(error.as_ref()), "{error}");
        assert!(body.frame().await.is_none());
    }
}
