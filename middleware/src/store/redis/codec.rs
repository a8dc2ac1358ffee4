//! The value layout (see *Key layout* in the [`RedisStore`] docs) and the arguments and replies
//! of the scripts: durations as the scripts take them, the recovery point as they store it, and
//! what `begin`, `complete`, `renew`, `release` and `checkpoint` answer.
//!
//! [`RedisStore`]: super::RedisStore

use std::time::Duration;

use bytes::Bytes;
use redis::Value;

use super::unexpected;
use crate::fingerprint::Fingerprint;
use crate::lease::Checkpoint;
use crate::record::{DecodeError, StoredResponse};
use crate::store::{Begin, LeaseToken, StoreError};

/// The fixed header in front of every value; see *Key layout* in `RedisStore`'s docs.
pub(super) const HEADER_LEN: usize = 50;
/// Where the request fingerprint sits in the header.
const FINGERPRINT_RANGE: std::ops::Range<usize> = 2..34;
const LAYOUT_VERSION: u8 = 1;
pub(super) const STATE_IN_FLIGHT: u8 = 1;
pub(super) const STATE_COMPLETED: u8 = 2;
/// The scripts compute deadlines in microseconds as Lua doubles; capping every duration at 100
/// years keeps `now + lease` far below 2^53 and inside what `PX` accepts.
const MAX_DURATION_MS: u64 = 100 * 365 * 24 * 3600 * 1000;

/// A duration in whole milliseconds, rounded up (a lease is never shorter than asked) and kept
/// within 1 ms (`PX 0` is an error) and [`MAX_DURATION_MS`].
pub(super) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros().div_ceil(1000))
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_DURATION_MS)
}

/// Twice the lease, so a takeover still sees the expired lease's token (see *Key layout*).
pub(super) fn in_flight_key_ttl(lease_ms: u64) -> u64 {
    lease_ms.saturating_mul(2)
}

/// Maps `begin`'s reply. A completed record is replayed only if the fingerprint in its header is
/// the request's: the script compared them already, but a reply paired with the wrong command (a
/// connection desynchronised by a bug anywhere between here and Redis) would otherwise hand one
/// key's response to another. Such a reply is a store error, never a replay.
pub(super) fn parse_begin(reply: Value, fingerprint: &Fingerprint) -> Result<Begin, StoreError> {
    let Value::Array(mut items) = reply else {
        return Err(unexpected("begin", &reply));
    };
    match items.as_mut_slice() {
        [
            Value::Int(1),
            Value::Int(token),
            Value::Int(attempt),
            Value::BulkString(point),
        ] => match (u64::try_from(*token), u32::try_from(*attempt)) {
            (Ok(token), Ok(attempt)) => Ok(Begin::Acquired {
                token: LeaseToken(token),
                attempt,
                recovery_point: decode_recovery_point(point)?,
            }),
            _ => Err(unexpected("begin", &Value::Int(*token))),
        },
        [Value::Int(2)] => Ok(Begin::InFlight),
        [Value::Int(3)] => Ok(Begin::Mismatch),
        [Value::Int(4), Value::BulkString(value), Value::Int(pttl)] => {
            let value = Bytes::from(std::mem::take(value));
            if let Some(error) = header_error(&value, STATE_COMPLETED) {
                return Err(StoreError::Corrupt(error));
            }
            if value[FINGERPRINT_RANGE] != fingerprint.as_bytes()[..] {
                return Err(StoreError::Corrupt(DecodeError::Invalid(
                    "fingerprint: the reply belongs to another request",
                )));
            }
            // The response shares the reply's allocation; only the header is skipped.
            Ok(Begin::Completed {
                response: StoredResponse::decode(value.slice(HEADER_LEN..))?,
                // PTTL is -1 for a key without an expiry, which this store never writes.
                expires_in: Duration::from_millis(u64::try_from(*pttl).unwrap_or(0)),
            })
        }
        // The script found a header it does not understand; say what is wrong with it.
        [Value::Int(0), Value::BulkString(header)] => Err(StoreError::Corrupt(
            header_error(header, STATE_IN_FLIGHT).unwrap_or(DecodeError::Invalid("record header")),
        )),
        _ => Err(unexpected("begin", &Value::Array(items))),
    }
}

/// The recovery point as the scripts store it: empty for none, else name length u8, name, data.
pub(super) fn encode_recovery_point(checkpoint: &Checkpoint) -> Vec<u8> {
    let name = checkpoint.name().as_bytes();
    let mut encoded = Vec::with_capacity(1 + name.len() + checkpoint.data().len());
    // Names are at most MAX_CHECKPOINT_NAME (64) bytes: the length fits a byte.
    encoded.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
    encoded.extend_from_slice(name);
    encoded.extend_from_slice(checkpoint.data());
    encoded
}

pub(super) fn decode_recovery_point(stored: &[u8]) -> Result<Option<Checkpoint>, StoreError> {
    let Some((&len, rest)) = stored.split_first() else {
        return Ok(None);
    };
    let len = usize::from(len);
    if rest.len() < len {
        return Err(StoreError::Corrupt(DecodeError::Truncated));
    }
    let name = std::str::from_utf8(&rest[..len])
        .map_err(|_| StoreError::Corrupt(DecodeError::Invalid("checkpoint name")))?;
    Checkpoint::new(name, Bytes::copy_from_slice(&rest[len..]))
        .map(Some)
        .map_err(|_| StoreError::Corrupt(DecodeError::Invalid("checkpoint")))
}

/// What is wrong with a stored value that should have a header in `expected_state`, if anything.
fn header_error(value: &[u8], expected_state: u8) -> Option<DecodeError> {
    let Some(header) = value.get(..HEADER_LEN) else {
        return Some(DecodeError::Truncated);
    };
    if header[0] != LAYOUT_VERSION {
        return Some(DecodeError::UnknownVersion(header[0]));
    }
    (header[1] != expected_state).then_some(DecodeError::Invalid("record state"))
}

/// Maps the 1 / 0 answer of `complete`, `renew` and `release`.
pub(super) fn lease_outcome(script: &'static str, reply: Value) -> Result<(), StoreError> {
    match reply {
        Value::Int(1) => Ok(()),
        Value::Int(0) => Err(StoreError::LeaseLost),
        other => Err(unexpected(script, &other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_up_and_stay_in_range() {
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::from_micros(1)), 1);
        assert_eq!(millis(Duration::from_micros(1001)), 2);
        assert_eq!(millis(Duration::from_millis(400)), 400);
        assert_eq!(millis(Duration::MAX), MAX_DURATION_MS);
        assert_eq!(in_flight_key_ttl(400), 800);
    }

    fn test_fingerprint() -> Fingerprint {
        Fingerprint::from_bytes([7; 32])
    }

    /// A header carrying `test_fingerprint()`, as `begin` returns for the request it answers.
    fn header(version: u8, state: u8) -> Vec<u8> {
        let mut value = vec![version, state];
        value.extend_from_slice(test_fingerprint().as_bytes());
        value.resize(HEADER_LEN, 0);
        value
    }

    #[test]
    fn a_completed_reply_for_another_fingerprint_is_an_error_not_a_replay() {
        let response = StoredResponse::new(
            http::StatusCode::OK,
            http::HeaderMap::new(),
            Bytes::from_static(b"someone else's response"),
        );
        let mut value = header(LAYOUT_VERSION, STATE_COMPLETED);
        value.extend_from_slice(&response.encode());
        let reply = || {
            Value::Array(vec![
                Value::Int(4),
                Value::BulkString(value.clone()),
                Value::Int(90_000),
            ])
        };
        assert_eq!(
            parse_begin(reply(), &test_fingerprint()).unwrap(),
            Begin::Completed {
                response,
                expires_in: Duration::from_secs(90),
            }
        );
        assert!(matches!(
            parse_begin(reply(), &Fingerprint::from_bytes([8; 32])),
            Err(StoreError::Corrupt(DecodeError::Invalid(_)))
        ));
    }

    #[test]
    fn begin_replies_are_mapped() {
        let reply = |items: Vec<Value>| parse_begin(Value::Array(items), &test_fingerprint());
        assert_eq!(
            reply(vec![
                Value::Int(1),
                Value::Int(42),
                Value::Int(1),
                Value::BulkString(vec![])
            ])
            .unwrap(),
            Begin::Acquired {
                token: LeaseToken(42),
                attempt: 1,
                recovery_point: None,
            }
        );
        let point = Checkpoint::new("charged", Bytes::from_static(b"\0ch_1")).unwrap();
        assert_eq!(
            reply(vec![
                Value::Int(1),
                Value::Int(43),
                Value::Int(2),
                Value::BulkString(encode_recovery_point(&point))
            ])
            .unwrap(),
            Begin::Acquired {
                token: LeaseToken(43),
                attempt: 2,
                recovery_point: Some(point),
            }
        );
        assert_eq!(reply(vec![Value::Int(2)]).unwrap(), Begin::InFlight);
        assert_eq!(reply(vec![Value::Int(3)]).unwrap(), Begin::Mismatch);

        let response = StoredResponse::new(
            http::StatusCode::ACCEPTED,
            http::HeaderMap::new(),
            Bytes::from_static(b"body"),
        );
        let mut value = header(LAYOUT_VERSION, STATE_COMPLETED);
        value.extend_from_slice(&response.encode());
        assert_eq!(
            reply(vec![
                Value::Int(4),
                Value::BulkString(value),
                Value::Int(1500)
            ])
            .unwrap(),
            Begin::Completed {
                response,
                expires_in: Duration::from_millis(1500),
            }
        );
    }

    #[test]
    fn corrupt_or_unknown_replies_are_errors_not_panics() {
        let reply = |items: Vec<Value>| parse_begin(Value::Array(items), &test_fingerprint());
        assert!(matches!(
            reply(vec![Value::Int(0), Value::BulkString(b"junk".to_vec())]),
            Err(StoreError::Corrupt(DecodeError::Truncated))
        ));
        assert!(matches!(
            reply(vec![Value::Int(0), Value::BulkString(header(7, 1))]),
            Err(StoreError::Corrupt(DecodeError::UnknownVersion(7)))
        ));
        assert!(matches!(
            reply(vec![Value::Int(0), Value::BulkString(header(1, 9))]),
            Err(StoreError::Corrupt(DecodeError::Invalid(_)))
        ));
        let mut truncated_response = header(LAYOUT_VERSION, STATE_COMPLETED);
        truncated_response.push(1);
        assert!(matches!(
            reply(vec![
                Value::Int(4),
                Value::BulkString(truncated_response),
                Value::Int(1000)
            ]),
            Err(StoreError::Corrupt(DecodeError::Truncated))
        ));
        assert!(matches!(
            reply(vec![
                Value::Int(1),
                Value::Int(-1),
                Value::Int(1),
                Value::BulkString(vec![])
            ]),
            Err(StoreError::Backend(_))
        ));
        assert!(matches!(
            reply(vec![
                Value::Int(1),
                Value::Int(1),
                Value::Int(2),
                Value::BulkString(vec![9, b'a'])
            ]),
            Err(StoreError::Corrupt(DecodeError::Truncated))
        ));
        assert!(matches!(reply(vec![]), Err(StoreError::Backend(_))));
        assert!(matches!(
            parse_begin(Value::Okay, &test_fingerprint()),
            Err(StoreError::Backend(_))
        ));
        assert!(matches!(
            lease_outcome("renew", Value::Int(0)),
            Err(StoreError::LeaseLost)
        ));
        assert!(matches!(
            lease_outcome("renew", Value::Nil),
            Err(StoreError::Backend(_))
        ));
    }
}
