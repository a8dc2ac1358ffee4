//! The error a response body reports when its next frame did not arrive in time.

use std::fmt;
use std::time::Duration;

/// A response body's next frame did not arrive within `0`: the producer (an upstream, a handler)
/// stalled mid-body.
///
/// A body that fails with this error (anywhere in its source chain) tells the layer it timed out
/// rather than broke. The layer reads bodies of known length whole before it sends the response
/// head; a body that fails before the head went out is answered `504 upstream-timeout` for this
/// error and `502 upstream-unavailable` for any other. After the head went out, the client's
/// connection is cut. Either way the operation ran or may still be running: nothing is stored
/// and the key stays locked, unrenewed, until `lock_ttl` (as for
/// [`OutcomeUnknown`](crate::OutcomeUnknown)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyTimeout(pub Duration);

impl fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no part of the response body arrived within {}ms",
            self.0.as_millis()
        )
    }
}

impl std::error::Error for BodyTimeout {}

impl BodyTimeout {
    /// Whether `error` or one of its sources is a [`BodyTimeout`].
    pub fn is_in(error: &(dyn std::error::Error + 'static)) -> bool {
        let mut current = Some(error);
        while let Some(error) = current {
            if error.is::<Self>() {
                return true;
            }
            current = error.source();
        }
        false
    }
}
