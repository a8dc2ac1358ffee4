//! The subscriber: one pub/sub connection per store, fanning completions out to local waiters.

use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use redis::{Client, ErrorKind, Msg, RedisError, Value};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior, timeout};

use crate::scope::RecordKey;
use crate::store::{CompletionNotifier, ForgetSender};

/// How often an idle subscriber pings: a connection that died without a FIN or RST (a network
/// partition, a NAT dropping the flow) would otherwise look subscribed forever.
const HEALTH_CHECK_EVERY: Duration = Duration::from_secs(5);
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A connection that stayed up this long was healthy: the next reconnect starts from
/// [`MIN_BACKOFF`] again instead of where the last outage left the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(30);

type Subscribed = (PubSubSink, PubSubStream);

/// Subscribes to the completion channel and wakes local waiters for every message.
pub(super) struct Listener {
    /// Nodes to subscribe through, tried in turn: one for a standalone server, the seed nodes
    /// of a cluster (any node of a cluster receives every classic `PUBLISH`).
    nodes: Vec<Client>,
    channel: String,
    notifier: CompletionNotifier,
    /// Where forgets announced on the channel go, for in-process caches.
    forgets: ForgetSender,
    /// Bounds connecting, subscribing and each health-check ping.
    timeout: Duration,
}

impl Listener {
    pub(super) fn new(
        nodes: Vec<Client>,
        channel: String,
        notifier: CompletionNotifier,
        forgets: ForgetSender,
        timeout: Duration,
    ) -> Self {
        Self {
            nodes,
            channel,
            notifier,
            forgets,
            timeout,
        }
    }

    /// Subscribes through the first node that answers, then keeps the subscription alive on a
    /// task of its own. Returns once the server has confirmed the subscription, so nothing
    /// published afterwards is missed.
    pub(super) async fn start(self) -> Result<JoinHandle<()>, RedisError> {
        let mut first_error = None;
        for index in 0..self.nodes.len() {
            match self.subscribe(&self.nodes[index]).await {
                Ok(subscribed) => return Ok(tokio::spawn(self.run(subscribed, index + 1))),
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        Err(first_error
            .unwrap_or_else(|| RedisError::from((ErrorKind::Client, "no node to subscribe to"))))
    }

    async fn subscribe(&self, node: &Client) -> Result<Subscribed, RedisError> {
        let attempt = async {
            let (mut sink, stream) = node.get_async_pubsub().await?.split();
            sink.subscribe(self.channel.as_str()).await?;
            Ok((sink, stream))
        };
        match timeout(self.timeout, attempt).await {
            Ok(subscribed) => subscribed,
            Err(_) => Err(RedisError::from(std::io::Error::from(
                std::io::ErrorKind::TimedOut,
            ))),
        }
    }

    /// Delivers messages until the connection is lost, then resubscribes with backoff, forever
    /// (the store aborts this task when its last clone is dropped).
    async fn run(self, mut subscribed: Subscribed, mut next: usize) {
        let mut backoff = MIN_BACKOFF;
        loop {
            let connected_at = Instant::now();
            self.deliver_until_lost(subscribed).await;
            if connected_at.elapsed() >= STABLE_AFTER {
                backoff = MIN_BACKOFF;
            }
            subscribed = loop {
                // Jittered, so a fleet does not reconnect in lockstep after a server restart.
                tokio::time::sleep(jittered(backoff)).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                let Some(node) = self.nodes.get(next % self.nodes.len().max(1)) else {
                    return;
                };
                next = next.wrapping_add(1);
                match self.subscribe(node).await {
                    Ok(subscribed) => break subscribed,
                    Err(error) => tracing::warn!(
                        %error,
                        channel = %self.channel,
                        retry_in = ?backoff,
                        "cannot resubscribe to Redis completion notifications"
                    ),
                }
            };
            tracing::info!(
                channel = %self.channel,
                "resubscribed to Redis completion notifications"
            );
            // Completions published while no connection was subscribed are lost: every waiter
            // looks at the store again rather than sleeping until its poll interval.
            self.notifier.notify_all();
            // Forgets too: caches must treat every record as possibly forgotten.
            self.forgets.unknown();
        }
    }

    async fn deliver_until_lost(&self, (mut sink, mut stream): Subscribed) {
        let mut health =
            tokio::time::interval_at(Instant::now() + HEALTH_CHECK_EVERY, HEALTH_CHECK_EVERY);
        health.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                message = stream.next() => match message {
                    Some(message) => self.deliver(&message),
                    None => {
                        tracing::warn!(
                            channel = %self.channel,
                            "lost the Redis subscriber connection; reconnecting"
                        );
                        return;
                    }
                },
                _ = health.tick() => {
                    let pong = timeout(self.timeout, sink.ping::<Value>()).await;
                    if !matches!(pong, Ok(Ok(_))) {
                        tracing::warn!(
                            channel = %self.channel,
                            "the Redis subscriber connection stopped answering; reconnecting"
                        );
                        return;
                    }
                }
            }
        }
    }

    fn deliver(&self, message: &Msg) {
        let payload = std::str::from_utf8(message.get_payload_bytes()).unwrap_or_default();
        let (forgot, hex_key) = match payload.strip_prefix(super::records::FORGET_PREFIX) {
            Some(hex_key) => (true, hex_key),
            None => (false, payload),
        };
        match RecordKey::from_hex(hex_key) {
            Some(key) => {
                self.notifier.notify(&key);
                if forgot {
                    self.forgets.forgot(&key);
                }
            }
            None => tracing::debug!(
                channel = message.get_channel_name(),
                "ignoring a completion message that is not a record key"
            ),
        }
    }
}

/// `delay` scaled by a random factor in [0.5, 1).
fn jittered(delay: Duration) -> Duration {
    // Every `RandomState` is seeded afresh: good enough randomness for jitter, without a
    // dependency.
    let random = RandomState::new().hash_one(0u8) % 1000;
    delay / 2 + delay.mul_f64(random as f64 / 2000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_between_half_and_the_whole_delay() {
        for _ in 0..100 {
            let delay = jittered(Duration::from_millis(100));
            assert!(delay >= Duration::from_millis(50) && delay < Duration::from_millis(100));
        }
    }
}
