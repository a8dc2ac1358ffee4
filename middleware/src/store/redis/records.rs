//! Inspecting and forgetting records of the Redis store, and announcing forgets on the
//! completion channel (see [`IdempotencyStore::forget`](crate::IdempotencyStore::forget)).

use std::sync::LazyLock;

use bytes::Bytes;
use redis::{Script, Value};

use super::RedisStore;
use super::codec::{HEADER_LEN, STATE_COMPLETED, STATE_IN_FLIGHT, decode_recovery_point};
use crate::fingerprint::Fingerprint;
use crate::record::DecodeError;
use crate::scope::RecordKey;
use crate::store::{Forgotten, LeaseToken, RecordInfo, RecordState, StoreError, unix_micros};

pub(super) static INSPECT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("inspect.lua")));
pub(super) static FORGET: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("forget.lua")));

/// Messages on the completion channel that start with this announce a forget; the rest is the
/// record key in hex. Completions carry the bare hex key, so listeners of earlier versions ignore
/// forgets rather than misread them.
pub(super) const FORGET_PREFIX: &str = "forget:";

impl RedisStore {
    pub(super) async fn inspect_record(
        &self,
        key: &RecordKey,
    ) -> Result<Option<RecordInfo>, StoreError> {
        let invocation = INSPECT.key(self.redis_key(key));
        let reply = self.invoke("inspect", &invocation).await?;
        let Value::Array(mut items) = reply else {
            return Err(StoreError::backend("inspect: unexpected reply"));
        };
        let (value, pttl, now_us) = match items.as_mut_slice() {
            [] => return Ok(None),
            [
                Value::BulkString(value),
                Value::Int(pttl),
                Value::Int(now_us),
            ] => (Bytes::from(std::mem::take(value)), *pttl, *now_us),
            _ => return Err(StoreError::backend("inspect: unexpected reply")),
        };
        let now_us = u64::try_from(now_us).unwrap_or(0);
        let header = value
            .get(..HEADER_LEN)
            .ok_or(StoreError::Corrupt(DecodeError::Truncated))?;
        let mut fingerprint = [0u8; 32];
        fingerprint.copy_from_slice(&header[2..34]);
        let fingerprint = Fingerprint::from_bytes(fingerprint);
        let token = u64::from_be_bytes(header[34..42].try_into().unwrap_or_default());
        let lease_until = u64::from_be_bytes(header[42..50].try_into().unwrap_or_default());
        match header[1] {
            STATE_COMPLETED => {
                // A completed record lives exactly as long as its key.
                let ttl_us = u64::try_from(pttl).unwrap_or(0).saturating_mul(1000);
                RecordInfo::completed(
                    fingerprint,
                    unix_micros(now_us + ttl_us),
                    value.slice(HEADER_LEN..),
                )
                .map(Some)
            }
            STATE_IN_FLIGHT | WATCHED if lease_until > now_us => {
                let tail = &value[HEADER_LEN..];
                let attempt = tail.get(..4).map_or(1, |a| {
                    u32::from_be_bytes(a.try_into().unwrap_or([0, 0, 0, 1]))
                });
                let checkpoint = decode_recovery_point(tail.get(4..).unwrap_or_default())?
                    .map(|point| point.name().to_owned());
                Ok(Some(RecordInfo::new(
                    fingerprint,
                    unix_micros(lease_until),
                    RecordState::InFlight {
                        token: LeaseToken(token),
                        attempt,
                        checkpoint,
                    },
                )))
            }
            // A lapsed lease is not live.
            STATE_IN_FLIGHT | WATCHED => Ok(None),
            _ => Err(StoreError::Corrupt(DecodeError::Invalid("record state"))),
        }
    }

    pub(super) async fn forget_record(
        &self,
        key: &RecordKey,
        force: bool,
    ) -> Result<Forgotten, StoreError> {
        let name = self.redis_key(key);
        let mut invocation = FORGET.key(&name[..]);
        invocation
            .arg(if force { "1" } else { "0" })
            .arg(&self.inner.channel)
            .arg(format!("{FORGET_PREFIX}{}", key.to_hex()));
        let reply = self.invoke("forget", &invocation).await?;
        let lease = |token: &i64, attempt: &i64| {
            (
                LeaseToken(u64::try_from(*token).unwrap_or(0)),
                u32::try_from(*attempt).unwrap_or(1),
            )
        };
        let forgotten = match reply {
            Value::Array(items) => match items.as_slice() {
                [Value::Int(0)] => Forgotten::NotFound,
                [Value::Int(1)] => Forgotten::Completed,
                [Value::Int(2), Value::Int(token), Value::Int(attempt)] => {
                    let (token, attempt) = lease(token, attempt);
                    Forgotten::LeaseEnded { token, attempt }
                }
                [Value::Int(3), Value::Int(token), Value::Int(attempt)] => {
                    let (token, attempt) = lease(token, attempt);
                    Forgotten::InFlight { token, attempt }
                }
                _ => return Err(StoreError::backend("forget: unexpected reply")),
            },
            _ => return Err(StoreError::backend("forget: unexpected reply")),
        };
        if forgotten.deleted() {
            // Local waiters and caches need not wait for the message to come back.
            self.inner.notifier.notify(key);
            self.inner.forgets.forgot(key);
        }
        Ok(forgotten)
    }
}

/// State 3: in flight, and a process waits for it (see `watch.lua`).
const WATCHED: u8 = 3;
