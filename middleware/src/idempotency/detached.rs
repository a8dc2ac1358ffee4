//! Detaching: a future that runs in the caller's task until the caller stops waiting, then
//! finishes on a task of its own. Both the `begin` call and the run under a lease go through it,
//! so an abandoned request never leaves its work (or its lease) half done.

use std::future::Future;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;

/// What to do, on a task of its own, with the output of a [`Detached`] future whose caller left.
pub(super) type Abandoned<T> = Box<dyn FnOnce(T) -> BoxFuture<'static, ()> + Send>;

/// A future that finishes even if its caller stops waiting: dropped before completion, it moves
/// to a task of its own, and its output goes to `abandoned` there. Running in the caller's task
/// until then spares every request a spawn and a cross-thread wake-up, which is most of what a
/// detached task would cost.
pub(super) struct Detached<F: Future + Send + 'static>
where
    F::Output: Send,
{
    future: Option<std::pin::Pin<Box<F>>>,
    abandoned: Option<Abandoned<F::Output>>,
}

impl<F: Future + Send + 'static> Detached<F>
where
    F::Output: Send,
{
    pub(super) fn new(future: F, abandoned: Abandoned<F::Output>) -> Self {
        Self {
            future: Some(Box::pin(future)),
            abandoned: Some(abandoned),
        }
    }
}

impl<F: Future + Send + 'static> Future for Detached<F>
where
    F::Output: Send,
{
    type Output = F::Output;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let Some(future) = self.future.as_mut() else {
            return Poll::Pending;
        };
        let output = std::task::ready!(future.as_mut().poll(cx));
        self.future = None;
        Poll::Ready(output)
    }
}

impl<F: Future + Send + 'static> Drop for Detached<F>
where
    F::Output: Send,
{
    fn drop(&mut self) {
        // A future that panicked must not be polled again; its lease guard releases the lease.
        if std::thread::panicking() {
            return;
        }
        if let (Some(future), Some(abandoned), Ok(runtime)) = (
            self.future.take(),
            self.abandoned.take(),
            tokio::runtime::Handle::try_current(),
        ) {
            runtime.spawn(async move { abandoned(future.await).await });
        }
    }
}
