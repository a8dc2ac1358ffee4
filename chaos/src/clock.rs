//! The run's one clock: milliseconds since it started, monotonic, shared by the client fleet,
//! the upstream and the nemesis so that their records can be ordered against each other.

use std::time::Instant;

use crate::history::Millis;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock(Instant);

impl Clock {
    pub(crate) fn start() -> Self {
        Self(Instant::now())
    }

    pub(crate) fn now(&self) -> Millis {
        self.0.elapsed().as_millis() as Millis
    }
}
