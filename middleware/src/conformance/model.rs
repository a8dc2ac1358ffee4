//! The model-based check, [`check_model`]: random sequences of `begin`, `complete`, `renew`,
//! `release` and sleeps, each answer compared with a model of the contract's **Atomic begin**,
//! **Lease expiry and takeover**, **Fencing**, **Replay**, **Release** and **Expiry is enforced
//! on read** points (and **Independence**, as the sequences mix keys).

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};

use super::LONG;
use super::support::{comparable, completed, fingerprint, key};
use crate::record::StoredResponse;
use crate::store::{Begin, IdempotencyStore, LeaseToken, StoreError};

/// A lease or TTL that [`check_model`] lets expire at its next [`ModelOp::Sleep`].
pub const MODEL_SHORT: Duration = Duration::from_millis(200);
/// How long [`ModelOp::Sleep`] sleeps: comfortably past [`MODEL_SHORT`].
pub const MODEL_SLEEP: Duration = Duration::from_millis(450);

/// Which token a [`ModelOp`] presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenChoice {
    /// The latest token issued for the key.
    Latest,
    /// The token issued `n` acquisitions before the latest one (wrapping around).
    Earlier(u8),
    /// A token never issued for the key.
    Bogus,
}

/// One step of [`check_model`]. Keys and fingerprints are small numbers so that random
/// sequences revisit them; `short` picks [`MODEL_SHORT`] over [`LONG`] for leases and TTLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelOp {
    /// `begin(key, fingerprint, short or long lease)`.
    Begin {
        /// Which key.
        key: u8,
        /// Which fingerprint.
        fingerprint: u8,
        /// A short lease.
        short: bool,
    },
    /// `complete(key, token, response tagged body, short or long ttl)`.
    Complete {
        /// Which key.
        key: u8,
        /// Which token.
        token: TokenChoice,
        /// A short TTL.
        short: bool,
        /// Tags the stored response.
        body: u8,
    },
    /// `release(key, token)`.
    Release {
        /// Which key.
        key: u8,
        /// Which token.
        token: TokenChoice,
    },
    /// `renew(key, token, short or long lease)`.
    Renew {
        /// Which key.
        key: u8,
        /// Which token.
        token: TokenChoice,
        /// A short lease.
        short: bool,
    },
    /// Sleep [`MODEL_SLEEP`]: everything short expires.
    Sleep,
}

#[derive(Debug, Clone, Copy)]
struct ModelRecord {
    fingerprint: u8,
    token: LeaseToken,
    /// `None`: in flight; `Some(body)`: completed.
    completed: Option<u8>,
    /// The epoch (count of sleeps) at which it expires, `None` for never within a check.
    expires: Option<u64>,
}

fn model_response(body: u8) -> StoredResponse {
    let mut headers = HeaderMap::new();
    headers.insert("x-body", HeaderValue::from(u16::from(body)));
    StoredResponse::new(StatusCode::OK, headers, Bytes::from(vec![body; 3]))
}

/// Runs `ops` against `store` and against a model of the contract, failing on the first answer
/// the contract does not allow.
///
/// Where the contract leaves a choice (a lapsed lease nobody took over *may* still be completed,
/// renewed or released), either answer passes and the model follows the store. Time is
/// [`MODEL_SLEEP`] per sleep: under a paused tokio clock (the memory store) a check takes no real
/// time; with a store on its own clock it really sleeps.
pub async fn check_model(store: impl IdempotencyStore, ops: &[ModelOp]) {
    let mut records: std::collections::HashMap<u8, ModelRecord> = Default::default();
    let mut issued: std::collections::HashMap<u8, Vec<LeaseToken>> = Default::default();
    let mut epoch = 0u64;
    let model_key = |key: u8| self::key(&format!("model-{key}"));
    let lifetime = |short: bool, epoch: u64| if short { Some(epoch + 1) } else { None };
    let duration = |short: bool| if short { MODEL_SHORT } else { LONG };

    for (step, op) in ops.iter().enumerate() {
        let context = || format!("step {step} ({op:?}) of {ops:#?}");
        let live = |record: &ModelRecord| record.expires.is_none_or(|at| epoch < at);
        let token_for = |key: u8, choice: TokenChoice| {
            let tokens = issued.get(&key).map(Vec::as_slice).unwrap_or_default();
            match (choice, tokens) {
                (TokenChoice::Latest, [.., last]) => *last,
                (TokenChoice::Earlier(n), [_, ..]) => {
                    tokens[tokens.len() - 1 - usize::from(n) % tokens.len()]
                }
                _ => LeaseToken(u64::MAX / 2),
            }
        };
        match *op {
            ModelOp::Sleep => {
                tokio::time::sleep(MODEL_SLEEP).await;
                epoch += 1;
            }
            ModelOp::Begin {
                key,
                fingerprint: fp,
                short,
            } => {
                let got = store
                    .begin(&model_key(key), &fingerprint(fp), duration(short))
                    .await
                    .map(comparable)
                    .unwrap_or_else(|error| panic!("begin failed: {error} at {}", context()));
                match records.get(&key).filter(|record| live(record)) {
                    Some(record) if record.fingerprint != fp => {
                        assert_eq!(got, Begin::Mismatch, "{}", context());
                    }
                    Some(ModelRecord {
                        completed: Some(body),
                        ..
                    }) => {
                        assert_eq!(got, completed(model_response(*body)), "{}", context());
                    }
                    Some(_) => assert_eq!(got, Begin::InFlight, "{}", context()),
                    None => {
                        let Begin::Acquired { token, .. } = got else {
                            panic!("expected to acquire, got {got:?} at {}", context());
                        };
                        let earlier = issued.entry(key).or_default();
                        if let Some(last) = earlier.last() {
                            assert!(token > *last, "token {token} after {last} at {}", context());
                        }
                        earlier.push(token);
                        records.insert(
                            key,
                            ModelRecord {
                                fingerprint: fp,
                                token,
                                completed: None,
                                expires: lifetime(short, epoch),
                            },
                        );
                    }
                }
            }
            ModelOp::Complete {
                key,
                token: choice,
                short,
                body,
            } => {
                let token = token_for(key, choice);
                let result = store
                    .complete(
                        &model_key(key),
                        token,
                        &model_response(body),
                        duration(short),
                    )
                    .await;
                let holder = records
                    .get(&key)
                    .filter(|record| record.completed.is_none() && record.token == token)
                    .copied();
                match (holder, result) {
                    (Some(record), Ok(())) => {
                        records.insert(
                            key,
                            ModelRecord {
                                completed: Some(body),
                                expires: lifetime(short, epoch),
                                ..record
                            },
                        );
                    }
                    (Some(record), Err(StoreError::LeaseLost)) if !live(&record) => {
                        records.remove(&key);
                    }
                    (None, Err(StoreError::LeaseLost)) => {}
                    (holder, result) => {
                        panic!("complete: {result:?} for {holder:?} at {}", context())
                    }
                }
            }
            ModelOp::Renew {
                key,
                token: choice,
                short,
            } => {
                let token = token_for(key, choice);
                let result = store.renew(&model_key(key), token, duration(short)).await;
                let holder = records
                    .get(&key)
                    .filter(|record| record.completed.is_none() && record.token == token)
                    .copied();
                match (holder, result) {
                    (Some(record), Ok(())) => {
                        records.insert(
                            key,
                            ModelRecord {
                                expires: lifetime(short, epoch),
                                ..record
                            },
                        );
                    }
                    (Some(record), Err(StoreError::LeaseLost)) if !live(&record) => {
                        records.remove(&key);
                    }
                    (None, Err(StoreError::LeaseLost)) => {}
                    (holder, result) => panic!("renew: {result:?} for {holder:?} at {}", context()),
                }
            }
            ModelOp::Release { key, token: choice } => {
                let token = token_for(key, choice);
                let result = store.release(&model_key(key), token).await;
                let holder = records
                    .get(&key)
                    .filter(|record| record.completed.is_none() && record.token == token)
                    .copied();
                match (holder, result) {
                    (Some(_), Ok(())) => {
                        records.remove(&key);
                    }
                    (Some(record), Err(StoreError::LeaseLost)) if !live(&record) => {
                        records.remove(&key);
                    }
                    (None, Err(StoreError::LeaseLost)) => {}
                    (holder, result) => {
                        panic!("release: {result:?} for {holder:?} at {}", context())
                    }
                }
            }
        }
    }
}
