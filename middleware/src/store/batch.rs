//! Group commit for the SQL stores: concurrent calls merged into one statement or one
//! transaction per round trip.
//!
//! A [`Batcher`] queues calls for a few worker tasks. A worker takes everything queued when it
//! becomes free (up to [`MAX_BATCH`]) and runs it as one batch; while that batch is in flight
//! the next one gathers in the queue. There is no timer: a lone call finds a worker waiting and
//! runs at once, so batching never delays a request by more than one pass of the runtime's
//! ready tasks (the worker yields once before it takes the queue, so that requests about to
//! make their call join the batch: at 32 connections on PostgreSQL, batches of one went from
//! 68% to 48% and new keys from about 8,000 to 8,900 a second).
//!
//! A batch is committed, or it fails as a whole: when [`Execute::execute`] returns an error,
//! every call of the batch gets that error, and none of them has been acknowledged.
//!
//! Two calls on one record key share a batch only where the executor says one can be answered
//! from the other ([`Execute::may_share`]: a `begin` repeating the same request, as the replays
//! of a hot key do); otherwise they run in successive batches, in the order they were queued,
//! exactly as if sequential. The statements therefore never write a key twice (PostgreSQL
//! refuses to `ON CONFLICT DO UPDATE` a row twice in one statement, and an `UPDATE ... FROM`
//! would apply only one of them).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, mpsc, oneshot};

use super::StoreError;

/// Histogram of the number of calls per batch, labelled `backend` (`postgres`, `sqlite`) and
/// `operation` (`begin`, `complete`; SQLite's single writer: `write`). Recorded once per batch,
/// through the [`metrics`] facade.
pub const STORE_BATCH_SIZE: &str = "idempotency_store_batch_size";

/// The most calls one batch holds: keeps one statement's arrays, and the time one transaction
/// holds locks, bounded.
pub(crate) const MAX_BATCH: usize = 256;

/// What runs a batch.
pub(crate) trait Execute: Send + Sync + 'static {
    /// One call.
    type Request: Send + 'static;
    /// Its answer.
    type Response: Send + 'static;

    /// The record a call touches, when calls on one record must not share a batch.
    fn record_key(request: &Self::Request) -> Option<[u8; 32]>;

    /// Whether `later`, a call on the same record queued after `first`, may run in `first`'s
    /// batch: the executor then answers it from `first`'s answer, as if it ran right after.
    /// Default: never.
    fn may_share(first: &Self::Request, later: &Self::Request) -> bool {
        let _ = (first, later);
        false
    }

    /// Runs `batch` in one round trip (statement or transaction): one answer per call, in order,
    /// or an error that fails every call of the batch (nothing of it committed).
    fn execute(
        &self,
        batch: Vec<Self::Request>,
    ) -> impl Future<Output = Result<Vec<Result<Self::Response, StoreError>>, StoreError>> + Send;
}

struct Job<E: Execute> {
    request: E::Request,
    reply: oneshot::Sender<Result<E::Response, StoreError>>,
}

/// The queue in front of an [`Execute`]; dropping it stops the workers once they are idle.
pub(crate) struct Batcher<E: Execute> {
    queue: mpsc::UnboundedSender<Job<E>>,
}

impl<E: Execute> Batcher<E> {
    /// Starts `in_flight` workers (at least one): at most that many batches run at once. A batch
    /// not done within `deadline` is abandoned (its future dropped, which rolls back what has
    /// not committed) and its calls fail with [`StoreError::Timeout`]: a connection that hangs
    /// (a black-holed network) holds up one worker for that long, never for good.
    pub(crate) fn spawn(
        executor: E,
        backend: &'static str,
        operation: &'static str,
        in_flight: usize,
        deadline: Duration,
    ) -> Self {
        let (queue, jobs) = mpsc::unbounded_channel();
        let jobs = Arc::new(Mutex::new(jobs));
        let executor = Arc::new(executor);
        let size =
            metrics::histogram!(STORE_BATCH_SIZE, "backend" => backend, "operation" => operation);
        for _ in 0..in_flight.max(1) {
            let (jobs, executor, size) = (Arc::clone(&jobs), Arc::clone(&executor), size.clone());
            tokio::spawn(async move {
                while let Some(batch) = gather(&jobs).await {
                    run(&*executor, batch, &size, deadline).await;
                }
            });
        }
        Self { queue }
    }

    /// Queues `request` and waits for its batch to be committed (or to fail).
    ///
    /// Dropping the future does not withdraw the call: like a statement already sent, it runs,
    /// and a lease it acquires for nobody expires after its `lock_ttl`.
    pub(crate) async fn call(&self, request: E::Request) -> Result<E::Response, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Job { request, reply })
            .map_err(|_| StoreError::backend("the store's batch worker has stopped"))?;
        answer
            .await
            .map_err(|_| StoreError::backend("the store's batch worker stopped mid-batch"))?
    }
}

/// Waits for a first call, then takes every call already queued, up to [`MAX_BATCH`]. `None`
/// once the [`Batcher`] is gone and the queue is empty.
async fn gather<E: Execute>(jobs: &Mutex<mpsc::UnboundedReceiver<Job<E>>>) -> Option<Vec<Job<E>>> {
    let mut jobs = jobs.lock().await;
    let first = jobs.recv().await?;
    // Before taking what is queued, let the tasks that are ready to run go first: under load
    // they are requests a moment from their own call, which then share this batch instead of
    // each waiting for a batch of one. No timer: on an idle runtime this returns at once.
    tokio::task::yield_now().await;
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        match jobs.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    Some(batch)
}

/// Runs `jobs` as one batch per round of distinct keys, and answers every call.
async fn run<E: Execute>(
    executor: &E,
    mut jobs: Vec<Job<E>>,
    size: &metrics::Histogram,
    deadline: Duration,
) {
    while !jobs.is_empty() {
        let (round, later) = split_duplicates::<E>(jobs);
        jobs = later;
        #[allow(clippy::cast_precision_loss)] // at most MAX_BATCH
        size.record(round.len() as f64);
        let (requests, replies): (Vec<_>, Vec<_>) = round
            .into_iter()
            .map(|job| (job.request, job.reply))
            .unzip();
        let count = replies.len();
        let answered = tokio::time::timeout(deadline, executor.execute(requests))
            .await
            .unwrap_or(Err(StoreError::Timeout(deadline)));
        match answered {
            Ok(answers) if answers.len() == count => {
                for (reply, answer) in replies.into_iter().zip(answers) {
                    // A caller that went away no longer needs its answer.
                    let _ = reply.send(answer);
                }
            }
            Ok(answers) => {
                let message = format!(
                    "a batch of {count} calls came back with {} answers",
                    answers.len()
                );
                for reply in replies {
                    let _ = reply.send(Err(StoreError::backend(message.clone())));
                }
            }
            Err(StoreError::Timeout(after)) => {
                tracing::debug!(count, ?after, "a store batch timed out");
                for reply in replies {
                    let _ = reply.send(Err(StoreError::Timeout(after)));
                }
            }
            Err(error) => {
                tracing::debug!(%error, count, "a store batch failed");
                let message = error.to_string();
                for reply in replies {
                    let _ = reply.send(Err(StoreError::backend(message.clone())));
                }
            }
        }
    }
}

/// Splits `jobs` into this round (the first call on each key, in queue order, with the calls
/// that [may share](Execute::may_share) its batch) and the rest, which wait for the next round.
fn split_duplicates<E: Execute>(jobs: Vec<Job<E>>) -> (Vec<Job<E>>, Vec<Job<E>>) {
    // Each key's first call, by its place in `round`.
    let mut first: std::collections::HashMap<[u8; 32], usize> =
        std::collections::HashMap::with_capacity(jobs.len());
    let (mut round, mut later) = (Vec::with_capacity(jobs.len()), Vec::new());
    for job in jobs {
        let Some(key) = E::record_key(&job.request) else {
            round.push(job);
            continue;
        };
        match first.get(&key) {
            Some(&at) if E::may_share(&round[at].request, &job.request) => round.push(job),
            Some(_) => later.push(job),
            None => {
                first.insert(key, round.len());
                round.push(job);
            }
        }
    }
    (round, later)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    /// Records the batches it is given; fails any batch holding the request `u8::MAX`.
    #[derive(Default)]
    struct Recorder(Arc<StdMutex<Vec<Vec<u8>>>>);

    impl Execute for Recorder {
        type Request = u8;
        type Response = u8;

        fn record_key(request: &u8) -> Option<[u8; 32]> {
            Some([*request % 4; 32])
        }

        async fn execute(&self, batch: Vec<u8>) -> Result<Vec<Result<u8, StoreError>>, StoreError> {
            self.0.lock().unwrap().push(batch.clone());
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            if batch.contains(&u8::MAX) {
                return Err(StoreError::backend("boom"));
            }
            Ok(batch.into_iter().map(Ok).collect())
        }
    }

    /// A batcher with one worker over `executor`.
    fn one_worker<E: Execute>(executor: E) -> Arc<Batcher<E>> {
        Arc::new(Batcher::spawn(
            executor,
            "test",
            "op",
            1,
            Duration::from_secs(5),
        ))
    }

    #[tokio::test]
    async fn calls_queued_during_a_batch_form_the_next_one() {
        let recorder = Recorder::default();
        let seen = Arc::clone(&recorder.0);
        let batcher = one_worker(recorder);
        let lone = batcher.call(0).await.unwrap();
        assert_eq!(lone, 0);
        let calls: Vec<_> = (0..8u8)
            .map(|n| {
                let batcher = Arc::clone(&batcher);
                tokio::spawn(async move { batcher.call(n).await })
            })
            .collect();
        for (n, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap().unwrap(), u8::try_from(n).unwrap());
        }
        let batches = seen.lock().unwrap().clone();
        assert_eq!(batches[0], vec![0], "a lone call runs alone, at once");
        // 8 calls on 4 keys: never two calls on one key in a batch, and in queue order.
        for batch in &batches {
            let mut keys: Vec<_> = batch.iter().map(|n| n % 4).collect();
            keys.sort_unstable();
            keys.dedup();
            assert_eq!(keys.len(), batch.len(), "{batches:?}");
        }
        let flat: Vec<_> = batches[1..].iter().flatten().copied().collect();
        let first_of_key_0 = flat.iter().position(|n| *n == 0).unwrap();
        let second_of_key_0 = flat.iter().position(|n| *n == 4).unwrap();
        assert!(first_of_key_0 < second_of_key_0, "{batches:?}");
        assert!(batches.len() < 1 + 8, "calls were merged: {batches:?}");
    }

    /// Requests woken together (their upstream answered in one burst) make their calls one after
    /// another; the first call wakes the idle worker, which tokio runs next (its LIFO slot), ahead
    /// of the other requests: without the yield in `gather` it took that one call alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn calls_made_by_tasks_woken_together_share_one_batch() {
        let recorder = Recorder::default();
        let seen = Arc::clone(&recorder.0);
        let batcher = one_worker(recorder);
        let burst = Arc::new(tokio::sync::Notify::new());
        let calls: Vec<_> = (0..4u8)
            .map(|n| {
                let (batcher, burst) = (Arc::clone(&batcher), Arc::clone(&burst));
                tokio::spawn(async move {
                    let woken = burst.notified();
                    tokio::pin!(woken);
                    woken.as_mut().enable();
                    woken.await;
                    batcher.call(n).await
                })
            })
            .collect();
        // Every task is parked on the notification before it fires, from a task on the runtime's
        // thread, as the IO driver wakes requests (a wake from outside goes through another
        // queue).
        tokio::time::sleep(Duration::from_millis(20)).await;
        tokio::spawn(async move { burst.notify_waiters() })
            .await
            .unwrap();
        for (n, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap().unwrap(), u8::try_from(n).unwrap());
        }
        let batches = seen.lock().unwrap().clone();
        assert_eq!(batches.len(), 1, "one batch: {batches:?}");
    }

    /// A [`Recorder`] whose equal calls on one key may share a batch.
    #[derive(Default)]
    struct SharingRecorder(Recorder);

    impl Execute for SharingRecorder {
        type Request = u8;
        type Response = u8;

        fn record_key(request: &u8) -> Option<[u8; 32]> {
            Recorder::record_key(request)
        }

        fn may_share(first: &u8, later: &u8) -> bool {
            first == later
        }

        async fn execute(&self, batch: Vec<u8>) -> Result<Vec<Result<u8, StoreError>>, StoreError> {
            self.0.execute(batch).await
        }
    }

    /// Sends `1` to a one-worker batcher over `executor`, then, while that batch runs, `calls`:
    /// they gather into the next batch. Returns the answers to `calls`, in order.
    async fn behind_a_busy_worker<E>(executor: E, calls: &[u8]) -> Vec<Result<u8, StoreError>>
    where
        E: Execute<Request = u8, Response = u8>,
    {
        let batcher = one_worker(executor);
        let first = tokio::spawn({
            let batcher = Arc::clone(&batcher);
            async move { batcher.call(1).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let calls: Vec<_> = calls
            .iter()
            .map(|&n| {
                let batcher = Arc::clone(&batcher);
                tokio::spawn(async move { batcher.call(n).await })
            })
            .collect();
        assert_eq!(first.await.unwrap().unwrap(), 1);
        let mut answers = Vec::new();
        for call in calls {
            answers.push(call.await.unwrap());
        }
        answers
    }

    #[tokio::test]
    async fn calls_that_may_share_run_in_one_batch_and_the_others_after() {
        let recorder = SharingRecorder::default();
        let seen = Arc::clone(&recorder.0.0);
        // Key 0 three times as 8, once as 4 (another call on it), and key 2 once.
        let calls = [8u8, 8, 4, 8, 2];
        let answers = behind_a_busy_worker(recorder, &calls).await;
        for (n, answer) in calls.iter().zip(answers) {
            assert_eq!(answer.unwrap(), *n);
        }
        let batches = seen.lock().unwrap().clone();
        assert_eq!(batches, [vec![1], vec![8, 8, 8, 2], vec![4]]);
    }

    #[tokio::test]
    async fn a_failing_batch_fails_every_call_in_it() {
        for answer in behind_a_busy_worker(Recorder::default(), &[2, u8::MAX, 5]).await {
            let error = answer.unwrap_err();
            assert!(error.to_string().contains("boom"), "{error}");
        }
    }
}
