//! The client fleet: keyed requests retried the way real SDKs retry them (a timeout per attempt,
//! exponential backoff with jitter, the same key and body on every retry, sometimes through
//! another proxy), with a share of duplicates sent concurrently, a share of keys reused with
//! another body, and the same key sent by two callers.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::Clock;
use crate::history::{Attempt, Millis, Outcome};
use crate::rng::Rng;

/// The callers (`Authorization` values): keys are scoped to them.
pub(crate) const SCOPES: [&str; 2] = ["Bearer tenant-a", "Bearer tenant-b"];
/// Longest a client waits for one attempt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(2_500);
/// Longest a client keeps retrying one operation.
pub(crate) const OPERATION_DEADLINE_MS: Millis = 20_000;
const MAX_ATTEMPTS: u32 = 20;

/// One logical request, as the seed decides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Operation {
    pub(crate) id: u64,
    pub(crate) scope: &'static str,
    pub(crate) key: String,
    pub(crate) body: String,
    /// The proxy the first attempt goes to.
    pub(crate) proxy: usize,
    /// Copies sent at once (concurrent duplicates), each to another proxy.
    pub(crate) copies: usize,
    /// Sent with the same key after the operation finished: must be refused (422).
    pub(crate) other_body: Option<String>,
}

/// The operation `id` of the run with `seed`. One in ten odd operations is the "twin" of the one
/// before: the same key string under the other caller, which must run separately.
pub(crate) fn operation(seed: u64, id: u64) -> Operation {
    let mut rng = Rng::fork(seed, 1, id);
    let twin = id % 2 == 1 && rng.chance(20);
    let (scope, key) = if twin {
        let previous = operation(seed, id - 1);
        let other = if previous.scope == SCOPES[0] {
            SCOPES[1]
        } else {
            SCOPES[0]
        };
        (other, previous.key)
    } else {
        (SCOPES[rng.range(0, 2) as usize], format!("s{seed}-op{id}"))
    };
    let amount = rng.range(1, 10_000);
    Operation {
        id,
        scope,
        key,
        body: format!("{{\"op\":{id},\"amount\":{amount}}}"),
        proxy: rng.range(0, 3) as usize,
        copies: if rng.chance(10) {
            rng.range(2, 4) as usize
        } else {
            1
        },
        other_body: rng
            .chance(5)
            .then(|| format!("{{\"op\":{id},\"amount\":{}}}", amount + 1)),
    }
}

/// Sends requests and records every attempt.
#[derive(Clone)]
pub(crate) struct Fleet {
    pub(crate) clock: Clock,
    pub(crate) seed: u64,
    pub(crate) ports: Arc<Vec<u16>>,
    pub(crate) client: reqwest::Client,
    pub(crate) history: Arc<Mutex<Vec<Attempt>>>,
}

impl Fleet {
    pub(crate) fn new(clock: Clock, seed: u64, ports: Vec<u16>) -> Self {
        Self {
            clock,
            seed,
            ports: Arc::new(ports),
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(32)
                .build()
                .expect("HTTP client"),
            history: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Runs one operation to its end: its copies at once, then its other-body reuse.
    pub(crate) async fn run(&self, operation: Operation) {
        let mut copies = Vec::new();
        for copy in 0..operation.copies {
            let fleet = self.clone();
            let operation = operation.clone();
            copies.push(tokio::spawn(async move {
                let proxy = (operation.proxy + copy) % fleet.ports.len();
                fleet
                    .send_with_retries(&operation, &operation.body, proxy, copy as u64)
                    .await;
            }));
        }
        for copy in copies {
            let _ = copy.await;
        }
        if let Some(other) = &operation.other_body {
            let proxy = (operation.proxy + 1) % self.ports.len();
            self.send_with_retries(&operation, other, proxy, 10).await;
        }
    }

    /// Retries until a final answer (2xx, or a 4xx other than 409 and 429), the attempt limit or
    /// the operation deadline.
    pub(crate) async fn send_with_retries(
        &self,
        operation: &Operation,
        body: &str,
        mut proxy: usize,
        stream: u64,
    ) {
        let mut rng = Rng::fork(self.seed, 3, operation.id * 16 + stream);
        let deadline = self.clock.now() + OPERATION_DEADLINE_MS;
        for attempt in 0..MAX_ATTEMPTS {
            let outcome = self.send(operation, body, proxy).await;
            let retry = match outcome {
                Outcome::Status { code, .. } => code == 409 || code == 429 || code >= 500,
                Outcome::Timeout | Outcome::Error(_) => true,
            };
            if !retry || self.clock.now() >= deadline {
                return;
            }
            let backoff = (100u64 << attempt.min(5)).min(2_000);
            tokio::time::sleep(Duration::from_millis(rng.range(backoff / 2, backoff + 1))).await;
            if rng.chance(50) {
                proxy = (proxy + 1) % self.ports.len();
            }
        }
    }

    async fn send(&self, operation: &Operation, body: &str, proxy: usize) -> Outcome {
        let sent = self.clock.now();
        let request = self
            .client
            .post(format!("http://127.0.0.1:{}/charges", self.ports[proxy]))
            .header("authorization", operation.scope)
            .header("idempotency-key", &operation.key)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .timeout(ATTEMPT_TIMEOUT);
        let outcome = match request.send().await {
            Ok(response) => {
                let code = response.status().as_u16();
                let replayed = response
                    .headers()
                    .get("idempotent-replayed")
                    .is_some_and(|value| value == "true");
                match response.bytes().await {
                    Ok(bytes) => Outcome::Status {
                        code,
                        replayed,
                        exec: execution_id(&bytes),
                    },
                    Err(error) if error.is_timeout() => Outcome::Timeout,
                    Err(error) => Outcome::Error(format!("{code}, then the body: {error}")),
                }
            }
            Err(error) if error.is_timeout() => Outcome::Timeout,
            Err(error) => Outcome::Error(error.to_string()),
        };
        let attempt = Attempt {
            op: operation.id,
            scope: operation.scope.to_owned(),
            key: operation.key.clone(),
            body: body.to_owned(),
            proxy,
            sent,
            received: self.clock.now(),
            outcome: outcome.clone(),
        };
        self.history.lock().expect("history").push(attempt);
        outcome
    }
}

/// The `exec` of an upstream body `{"exec": N}`.
fn execution_id(body: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()?
        .get("exec")?
        .as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_are_fixed_by_the_seed_and_twins_share_a_key_across_callers() {
        assert_eq!(operation(5, 17), operation(5, 17));
        let twins: Vec<u64> = (0..400)
            .filter(|&id| operation(5, id).key == operation(5, id.saturating_sub(1)).key && id > 0)
            .collect();
        assert!(!twins.is_empty());
        for id in twins {
            assert_ne!(operation(5, id).scope, operation(5, id - 1).scope);
        }
        assert!((0..400).any(|id| operation(5, id).copies > 1));
        assert!((0..400).any(|id| operation(5, id).other_body.is_some()));
    }
}
