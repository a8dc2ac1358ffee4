//! [`Records`]: what an operator does with one key (look at its record, forget it), with the
//! key computed exactly as the layer computes it for a request.

use std::sync::Arc;

use http::{HeaderMap, Request};

use super::layer::Shared;
use crate::key::{KeyError, parse_key_bytes};
use crate::scope::{RecordKey, Scope};
use crate::store::{Forgotten, IdempotencyStore, RecordInfo, StoreError};

/// Inspects and forgets the records of a layer's store; from [`IdempotencyLayer::records`].
///
/// Each operation takes the request's path (which picks the route policy, and with it the scope
/// headers and cookies that count), the headers the request would carry (its credentials) and
/// the idempotency key as sent, quoted or not. The record key is the digest the layer computes
/// for such a request (with the layer's custom scope function, if it has one), so no operator
/// needs to compute digests by hand.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use http::HeaderMap;
/// use tower_idempotency::{IdempotencyLayer, MemoryStore};
///
/// let layer = IdempotencyLayer::new(MemoryStore::new());
/// let mut credentials = HeaderMap::new();
/// credentials.insert("authorization", "Bearer alice".parse().unwrap());
/// let records = layer.records();
/// let found = records.inspect("/payments", &credentials, "\"order-1\"").await.unwrap();
/// assert!(found.is_none());
/// # }
/// ```
///
/// [`IdempotencyLayer::records`]: crate::IdempotencyLayer::records
pub struct Records<St> {
    shared: Arc<Shared<St>>,
}

impl<St> Clone for Records<St> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<St> std::fmt::Debug for Records<St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Records").finish_non_exhaustive()
    }
}

/// Why a [`Records`] operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordsError {
    /// The idempotency key is not one the layer accepts.
    #[error("invalid idempotency key: {0}")]
    InvalidKey(#[from] KeyError),
    /// The path is not a valid request path.
    #[error("invalid path {0:?}")]
    InvalidPath(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl<St: IdempotencyStore> Records<St> {
    pub(super) fn new(shared: Arc<Shared<St>>) -> Self {
        Self { shared }
    }

    /// The record key of a request to `path` carrying `headers` and idempotency key `key`.
    pub fn record_key(
        &self,
        path: &str,
        headers: &HeaderMap,
        key: &str,
    ) -> Result<RecordKey, RecordsError> {
        let key = parse_key_bytes(key.as_bytes())?;
        let mut request = Request::builder()
            .uri(path)
            .body(())
            .map_err(|_| RecordsError::InvalidPath(path.to_owned()))?;
        *request.headers_mut() = headers.clone();
        let (parts, ()) = request.into_parts();
        let scope = match &self.shared.scope {
            Some(scope) => scope(&parts),
            None => {
                let routes = self.shared.routes.current();
                let policy = routes.policy_for(parts.uri.path());
                Scope::from_credentials(
                    &parts.headers,
                    &policy.scope_headers,
                    &policy.scope_cookies,
                )
            }
        };
        Ok(RecordKey::new(&scope, &key))
    }

    /// The live record of that request's key, if any (see [`IdempotencyStore::inspect`]).
    pub async fn inspect(
        &self,
        path: &str,
        headers: &HeaderMap,
        key: &str,
    ) -> Result<Option<RecordInfo>, RecordsError> {
        let record_key = self.record_key(path, headers, key)?;
        Ok(self.shared.store.inspect(&record_key).await?)
    }

    /// Forgets that request's record: a completed one always, an in-flight lease only with
    /// `force` (see [`IdempotencyStore::forget`]).
    pub async fn forget(
        &self,
        path: &str,
        headers: &HeaderMap,
        key: &str,
        force: bool,
    ) -> Result<Forgotten, RecordsError> {
        let record_key = self.record_key(path, headers, key)?;
        Ok(self.shared.store.forget(&record_key, force).await?)
    }
}
