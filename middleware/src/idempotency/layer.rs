use std::fmt;
use std::future::Future;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use http::request::Parts;
use tokio::time::Instant;
use tower::Layer;

use super::Idempotency;
use super::callers::Callers;
use super::leases::LeasesInFlight;
use super::outcome::OutcomeHook;
use super::replay_cache::{ReplayCache, ReplayCacheLimits};
use crate::policy::{PathPattern, PatternError, Policy, PolicyError, Routes};
use crate::scope::Scope;
use crate::store::{IdempotencyStore, StoreError};
use crate::telemetry as m;

/// Derives the caller's [`Scope`] from a request, for apps whose callers are identified by
/// something other than headers (an authenticated principal in the extensions, a tenant in the
/// path...).
pub type ScopeFn = Arc<dyn Fn(&Parts) -> Scope + Send + Sync>;

/// A route or policy the layer refused at build time, so that a mistake surfaces when the app
/// starts rather than as a silently broken policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// The path pattern is malformed.
    #[error(transparent)]
    Pattern(PatternError),
    /// The default policy does not validate.
    #[error("invalid default policy: {0}")]
    Policy(PolicyError),
    /// A route's policy does not validate.
    #[error("invalid policy for route {path:?}: {error}")]
    RoutePolicy {
        /// The route's path pattern.
        path: String,
        /// What is wrong with its policy.
        error: PolicyError,
    },
}

/// Applies [`Idempotency`] to a service. See the [crate docs](crate) for the request lifecycle.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::time::Duration;
/// use tower_idempotency::{IdempotencyLayer, MemoryStore, OnConflict, Policy};
///
/// let layer = IdempotencyLayer::new(MemoryStore::new())
///     .policy(Policy::default().with_ttl(Duration::from_secs(3600)))
///     .route(
///         "/payments/**",
///         Policy::default().with_required(true).with_on_conflict(OnConflict::Wait),
///     );
/// # drop(layer); }
/// ```
pub struct IdempotencyLayer<St> {
    shared: Arc<Shared<St>>,
}

/// Settings shared by every clone of the service.
pub(crate) struct Shared<St> {
    pub(crate) store: Arc<St>,
    pub(crate) callers: Arc<Callers>,
    pub(crate) routes: Arc<RoutesCell>,
    pub(crate) leases: LeasesInFlight,
    pub(crate) scope: Option<ScopeFn>,
    pub(crate) on_outcome: Option<OutcomeHook>,
    pub(crate) store_timeout: Duration,
    pub(crate) poll_interval: Duration,
    /// Completed records answering replays without a store call; `None` when off.
    pub(crate) replay_cache: Option<Arc<ReplayCache>>,
}

impl<St> Clone for Shared<St> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            callers: self.callers.clone(),
            routes: self.routes.clone(),
            leases: self.leases.clone(),
            scope: self.scope.clone(),
            on_outcome: self.on_outcome.clone(),
            store_timeout: self.store_timeout,
            poll_interval: self.poll_interval,
            replay_cache: self.replay_cache.clone(),
        }
    }
}

impl<St: IdempotencyStore> Shared<St> {
    /// The store itself. Calls go to `St`'s methods rather than through the `Arc<St>`
    /// forwarding impl, which would box every store future a second time.
    pub(crate) fn store(&self) -> &St {
        &self.store
    }

    /// Runs one store operation under the store timeout, recording its latency and errors.
    pub(crate) async fn timed<T>(
        &self,
        operation: m::Operation,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let result = match tokio::time::timeout(self.store_timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout(self.store_timeout)),
        };
        m::store_call(operation, started.elapsed(), &result);
        result
    }
}

impl<St> Clone for IdempotencyLayer<St> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<St> fmt::Debug for IdempotencyLayer<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("routes", &self.shared.routes.current())
            .field("custom_scope", &self.shared.scope.is_some())
            .field("store_timeout", &self.shared.store_timeout)
            .field("poll_interval", &self.shared.poll_interval)
            .field("replay_cache", &self.shared.replay_cache.is_some())
            .finish_non_exhaustive()
    }
}

impl<St: IdempotencyStore> IdempotencyLayer<St> {
    /// A layer over `store` with the default [`Policy`] on every path.
    pub fn new(store: St) -> Self {
        Self::from_shared_store(Arc::new(store))
    }

    /// A layer over a store that is already shared, for example with a readiness probe.
    pub fn from_shared_store(store: Arc<St>) -> Self {
        let replay_cache = ReplayCache::new(&*store, ReplayCacheLimits::DEFAULT).map(Arc::new);
        Self {
            shared: Arc::new(Shared {
                store,
                callers: Arc::default(),
                routes: Arc::default(),
                leases: LeasesInFlight::default(),
                scope: None,
                on_outcome: None,
                store_timeout: Duration::from_secs(5),
                poll_interval: Duration::from_secs(1),
                replay_cache,
            }),
        }
    }

    fn shared_mut(&mut self) -> &mut Shared<St> {
        Arc::make_mut(&mut self.shared)
    }

    /// Replaces the default policy (routes added so far keep theirs).
    ///
    /// # Panics
    ///
    /// If the policy does not [validate](Policy::validate); [`try_policy`](Self::try_policy)
    /// returns the error instead.
    #[must_use]
    #[track_caller]
    pub fn policy(self, policy: Policy) -> Self {
        self.try_policy(policy)
            .unwrap_or_else(|error| panic!("{error}"))
    }

    /// [`policy`](Self::policy), returning an invalid policy as an error.
    pub fn try_policy(self, policy: Policy) -> Result<Self, RouteError> {
        policy.validate().map_err(RouteError::Policy)?;
        let current = self.shared.routes.current();
        let mut routes = Routes::new(policy).merge_slashes(current.merges_slashes());
        for (pattern, route_policy) in current.iter() {
            routes = routes.route(pattern.clone(), route_policy.clone());
        }
        Ok(self.routes_unchecked(routes))
    }

    /// Adds a per-path policy, as axum's `Router::route` adds a handler: `"/payments"` matches
    /// that path, `*` one segment, a final `**` the rest of the path (see [`PathPattern`]). The
    /// first matching route wins, else the default policy applies.
    ///
    /// # Panics
    ///
    /// If `path` is not a valid pattern or the policy does not [validate](Policy::validate);
    /// [`try_route`](Self::try_route) returns the error instead.
    #[must_use]
    #[track_caller]
    pub fn route(self, path: &str, policy: Policy) -> Self {
        self.try_route(path, policy)
            .unwrap_or_else(|error| panic!("{error}"))
    }

    /// [`route`](Self::route), returning a bad pattern or an invalid policy as an error.
    pub fn try_route(self, path: &str, policy: Policy) -> Result<Self, RouteError> {
        let pattern: PathPattern = path.parse().map_err(RouteError::Pattern)?;
        policy.validate().map_err(|error| RouteError::RoutePolicy {
            path: path.to_owned(),
            error,
        })?;
        let routes = Routes::clone(&self.shared.routes.current()).route(pattern, policy);
        Ok(self.routes_unchecked(routes))
    }

    /// Replaces the default policy and every route at once.
    ///
    /// # Panics
    ///
    /// If a policy does not [validate](Policy::validate); [`try_routes`](Self::try_routes)
    /// returns the error instead.
    #[must_use]
    #[track_caller]
    pub fn routes(self, routes: Routes) -> Self {
        self.try_routes(routes)
            .unwrap_or_else(|error| panic!("{error}"))
    }

    /// [`routes`](Self::routes), returning an invalid policy as an error.
    pub fn try_routes(self, routes: Routes) -> Result<Self, RouteError> {
        routes.validate().map_err(RouteError::Policy)?;
        Ok(self.routes_unchecked(routes))
    }

    fn routes_unchecked(mut self, routes: Routes) -> Self {
        // A cell of its own: a builder call changes this layer only, never a clone made earlier.
        self.shared_mut().routes = Arc::new(RoutesCell::new(routes));
        self
    }

    /// Whether repeated slashes in request paths are merged (`//a` is `/a`); see
    /// [`Routes::merge_slashes`]. Default `true`.
    #[must_use]
    pub fn merge_slashes(self, merge: bool) -> Self {
        let routes = Routes::clone(&self.shared.routes.current()).merge_slashes(merge);
        self.routes_unchecked(routes)
    }

    /// Scopes keys with `scope` instead of the policy's scope headers.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore, Scope};
    ///
    /// #[derive(Clone)]
    /// struct UserId(u64);
    ///
    /// // An auth layer outside this one put the authenticated user in the extensions.
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).scope_with(|parts| {
    ///     match parts.extensions.get::<UserId>() {
    ///         Some(user) => Scope::from_bytes(&user.0.to_be_bytes()),
    ///         None => Scope::anonymous(),
    ///     }
    /// });
    /// # drop(layer); }
    /// ```
    #[must_use]
    pub fn scope_with(mut self, scope: impl Fn(&Parts) -> Scope + Send + Sync + 'static) -> Self {
        self.shared_mut().scope = Some(Arc::new(scope));
        self
    }

    /// Runs `hook` once for every response the layer hands back, with its [`Outcome`] (also in
    /// the response's extensions) and the response head, which the hook may change. It runs in
    /// the request's task when the head is ready, before the body streams: keep it quick.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore, Outcome};
    ///
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).on_outcome(|outcome, head| {
    ///     if outcome == Outcome::Replayed {
    ///         head.headers.insert("x-served-from", "idempotency-store".parse().unwrap());
    ///     }
    /// });
    /// # drop(layer); }
    /// ```
    ///
    /// [`Outcome`]: crate::Outcome
    #[must_use]
    pub fn on_outcome(
        mut self,
        hook: impl Fn(crate::Outcome, &mut http::response::Parts) + Send + Sync + 'static,
    ) -> Self {
        self.shared_mut().on_outcome = Some(Arc::new(hook));
        self
    }

    /// Bounds every store call; a slower call counts as a store error. Default 5 seconds.
    #[must_use]
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.shared_mut().store_timeout = timeout;
        self
    }

    /// How often a waiting request looks at the store even without a notification, which is what
    /// finds a lease whose holder died. Default 1 second.
    #[must_use]
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.shared_mut().poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Answers replays from an in-process cache of completed records, bounded by `limits`, instead
    /// of a store call. On by default with [`ReplayCacheLimits::DEFAULT`];
    /// [`ReplayCacheLimits::OFF`] turns it off. It stays off for a store whose
    /// [`forget_feed`](IdempotencyStore::forget_feed) is `None`: a cached record must be dropped
    /// when any process sharing the store forgets it. A record is cached when a replay of it is
    /// read from the store (a new key costs one look-up that misses), until the record's own
    /// expiry (counted from before the store call that reported it), so a cached copy never
    /// outlives its record; a retry with another request under the
    /// same key gets `422` as from the store. A forget made by another process reaches this cache
    /// as fast as the store's notification arrives (PostgreSQL `NOTIFY`, Redis pub/sub, SQLite's
    /// forget log read every 100 ms): until then, this process may still replay it.
    #[must_use]
    pub fn replay_cache(mut self, limits: ReplayCacheLimits) -> Self {
        let cache = ReplayCache::new(&*self.shared.store, limits).map(Arc::new);
        self.shared_mut().replay_cache = cache;
        self
    }

    /// Whether replays are answered from an in-process cache (see [`Self::replay_cache`]).
    pub fn replay_cache_enabled(&self) -> bool {
        self.shared.replay_cache.is_some()
    }

    /// The routes in effect.
    pub fn routes_in_effect(&self) -> Arc<Routes> {
        self.shared.routes.current()
    }

    /// Replaces the default policy and every route of this layer, of its clones and of every
    /// service it made, while they run: requests that arrive afterwards use `routes`, requests
    /// already admitted keep the policy they started with. This is how a server reloads its
    /// configuration without dropping a connection.
    pub fn replace_routes(&self, routes: Routes) {
        self.shared.routes.replace(routes);
    }

    /// The leases this layer (its clones and services) holds and has not settled yet, for a
    /// graceful shutdown to wait on.
    pub fn leases_in_flight(&self) -> LeasesInFlight {
        self.shared.leases.clone()
    }

    /// Inspects and forgets records of this layer's store by the request that made them (path,
    /// credentials, key), with the record key computed as this layer computes it; see
    /// [`Records`](super::Records).
    pub fn records(&self) -> super::Records<St> {
        super::Records::new(self.shared.clone())
    }
}

/// The routes, replaceable at run time. Read once per request: an uncontended read lock and an
/// `Arc` clone of the matching policy, no allocation.
#[derive(Debug, Default)]
pub(crate) struct RoutesCell {
    routes: RwLock<Arc<Routes>>,
}

impl RoutesCell {
    fn new(routes: Routes) -> Self {
        Self {
            routes: RwLock::new(Arc::new(routes)),
        }
    }

    pub(crate) fn current(&self) -> Arc<Routes> {
        // A panic while holding the lock cannot leave the `Arc` half-written: use it anyway.
        self.routes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn replace(&self, routes: Routes) {
        *self.routes.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(routes);
    }
}

impl<S, St> Layer<S> for IdempotencyLayer<St> {
    type Service = Idempotency<S, St>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency::from_shared(inner, self.shared.clone())
    }
}

#[cfg(all(test, feature = "memory"))]
mod tests {
    use super::*;
    use crate::MemoryStore;

    fn layer() -> IdempotencyLayer<MemoryStore> {
        IdempotencyLayer::new(MemoryStore::new())
    }

    #[test]
    fn routes_are_strings_matched_in_order() {
        let layer = layer()
            .route("/payments/**", Policy::default().with_required(true))
            .route("/**", Policy::default().with_enabled(false));
        let routes = layer.routes_in_effect();
        assert!(routes.policy_for("/payments/7").required);
        assert!(!routes.policy_for("/feed").enabled);
    }

    #[test]
    fn a_bad_pattern_or_policy_is_refused_when_the_layer_is_built() {
        let bad_pattern = layer().try_route("payments", Policy::default());
        assert!(matches!(bad_pattern, Err(RouteError::Pattern(_))));

        let short_lease = Policy::default().with_lock_ttl(Duration::from_millis(1));
        match layer().try_route("/payments", short_lease.clone()) {
            Err(RouteError::RoutePolicy { path, error }) => {
                assert_eq!(path, "/payments");
                assert_eq!(error.field, "lock_ttl");
            }
            other => panic!("expected a policy error, got {other:?}"),
        }
        assert!(matches!(
            layer().try_policy(short_lease.clone()),
            Err(RouteError::Policy(_))
        ));
        assert!(matches!(
            layer().try_routes(Routes::new(short_lease)),
            Err(RouteError::Policy(_))
        ));
    }

    #[test]
    #[should_panic(expected = "invalid path pattern")]
    fn route_panics_on_a_bad_pattern() {
        let _ = layer().route("no-slash", Policy::default());
    }
}
