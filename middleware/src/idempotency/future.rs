//! The response future of [`Idempotency`](super::Idempotency).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures_util::future::BoxFuture;
use http::Response;
use pin_project_lite::pin_project;

use super::body::ResponseBody;
use super::outcome::{OutcomeHook, run_hook, tagged};
use crate::telemetry::Outcome;

pin_project! {
    /// Response future of [`Idempotency`](super::Idempotency).
    ///
    /// Requests the layer does not cover run the inner future directly, without boxing or
    /// spawning, so uncovered routes cost next to nothing.
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
        hook: Option<OutcomeHook>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E> {
        Passthrough { #[pin] future: F, outcome: Outcome },
        Managed { future: BoxFuture<'static, Result<Response<ResponseBody<B>>, E>> },
        Ready { response: Option<Response<ResponseBody<B>>> },
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
    pub(crate) fn passthrough(future: F, outcome: Outcome) -> Self {
        Self {
            kind: Kind::Passthrough { future, outcome },
            hook: None,
        }
    }

    pub(crate) fn managed(
        future: BoxFuture<'static, Result<Response<ResponseBody<B>>, E>>,
    ) -> Self {
        Self {
            kind: Kind::Managed { future },
            hook: None,
        }
    }

    pub(crate) fn ready(response: Response<ResponseBody<B>>) -> Self {
        Self {
            kind: Kind::Ready {
                response: Some(response),
            },
            hook: None,
        }
    }

    /// Runs `hook` on the response when it is ready.
    pub(crate) fn with_hook(mut self, hook: Option<&OutcomeHook>) -> Self {
        self.hook = hook.cloned();
        self
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = match this.kind.project() {
            KindProj::Passthrough { future, outcome } => {
                let response = ready!(future.poll(cx))?;
                tagged(response.map(ResponseBody::inner), *outcome)
            }
            KindProj::Managed { future } => ready!(future.as_mut().poll(cx))?,
            KindProj::Ready { response } => response
                .take()
                .expect("ResponseFuture polled after completion"),
        };
        Poll::Ready(Ok(match this.hook.take() {
            Some(hook) => run_hook(&hook, response),
            None => response,
        }))
    }
}
