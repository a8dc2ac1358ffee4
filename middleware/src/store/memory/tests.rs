//! The memory store's own bookkeeping: what it keeps, and for how long.

use super::*;
use crate::scope::Scope;

fn key(i: u32) -> RecordKey {
    RecordKey::new(&Scope::anonymous(), &i.to_be_bytes())
}

fn fingerprint() -> Fingerprint {
    Fingerprint::from_bytes([1; 32])
}

/// A store whose sweeper stays out of the way: the tests purge by hand.
fn unswept() -> MemoryStore {
    MemoryStore::builder()
        .sweep_interval(Duration::from_secs(3600))
        .build()
}

/// Takes the lease of a free `key`.
async fn acquire(store: &MemoryStore, key: &RecordKey, lock_ttl: Duration) -> LeaseToken {
    match store.begin(key, &fingerprint(), lock_ttl).await.unwrap() {
        Begin::Acquired { token, .. } => token,
        other => panic!("a free key must be acquired: {other:?}"),
    }
}

async fn complete(store: &MemoryStore, key: &RecordKey, token: LeaseToken, ttl: Duration) {
    let response = StoredResponse::new(http::StatusCode::OK, Default::default(), "x".into());
    store.complete(key, token, &response, ttl).await.unwrap();
}

fn heap_entries(store: &MemoryStore) -> usize {
    store
        .inner
        .shards
        .iter()
        .map(|shard| lock(shard).deadlines.len())
        .sum()
}

#[tokio::test]
async fn expired_records_are_purged_not_leaked() {
    let store = unswept();
    for i in 0..1000 {
        let token = acquire(&store, &key(i), Duration::from_secs(60)).await;
        complete(&store, &key(i), token, Duration::from_millis(500)).await;
    }
    assert_eq!(store.len(), 1000);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(store.purge_expired(), 1000);
    assert!(store.is_empty());
    assert_eq!(
        heap_entries(&store),
        1000,
        "the leases' entries, stale since completion, wait until they come due"
    );
}

#[tokio::test]
async fn a_record_keeps_one_deadline_entry_as_its_deadline_moves_later() {
    let store = unswept();
    let lock_ttl = Duration::from_millis(20);
    for i in 0..100 {
        let token = acquire(&store, &key(i), lock_ttl).await;
        store.renew(&key(i), token, lock_ttl).await.unwrap();
        complete(&store, &key(i), token, Duration::from_secs(3600)).await;
    }
    assert_eq!(
        heap_entries(&store),
        100,
        "renewals and completions push none"
    );
    // Past the leases' deadlines: their entries come due, and are pushed again at the records'
    // own deadlines.
    tokio::time::sleep(3 * lock_ttl).await;
    assert_eq!(store.purge_expired(), 0);
    assert_eq!(store.len(), 100);
    assert_eq!(heap_entries(&store), 100);
    assert!(matches!(
        store
            .begin(&key(7), &fingerprint(), lock_ttl)
            .await
            .unwrap(),
        Begin::Completed { .. }
    ));
}

#[tokio::test]
async fn a_key_released_and_begun_again_leaves_no_entries_behind() {
    let store = unswept();
    let lock_ttl = Duration::from_millis(10);
    // A client retrying against a failing upstream: each attempt is begun and released.
    for _ in 0..100 {
        let token = acquire(&store, &key(1), lock_ttl).await;
        store.release(&key(1), token).await.unwrap();
    }
    acquire(&store, &key(1), Duration::from_secs(3600)).await;
    tokio::time::sleep(3 * lock_ttl).await;
    assert_eq!(store.purge_expired(), 0);
    assert_eq!(
        heap_entries(&store),
        1,
        "only the live lease's entry is left"
    );
}

#[tokio::test]
async fn a_lease_renewed_for_less_is_purged_at_its_new_deadline() {
    let store = unswept();
    let token = acquire(&store, &key(1), Duration::from_secs(60)).await;
    store
        .renew(&key(1), token, Duration::from_millis(5))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    // (The sweeper's first pass, due at once, may come late and purge it first.)
    store.purge_expired();
    assert!(
        store.is_empty(),
        "kept twice the shorter lease, not the first"
    );
}

#[tokio::test]
async fn a_record_whose_deadline_moves_earlier_is_purged_on_time() {
    let store = unswept();
    let token = acquire(&store, &key(1), Duration::from_secs(60)).await;
    complete(&store, &key(1), token, Duration::from_millis(10)).await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    store.purge_expired();
    assert!(
        store.is_empty(),
        "purged at the record's ttl, not the lease's"
    );
}

#[tokio::test]
async fn the_sweeper_removes_expired_records_without_traffic() {
    let store = MemoryStore::builder()
        .sweep_interval(Duration::from_millis(10))
        .build();
    acquire(&store, &key(1), Duration::from_millis(5)).await;
    assert_eq!(store.len(), 1);
    tokio::time::timeout(Duration::from_secs(5), async {
        while !store.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the sweeper must remove the expired lease");
}
