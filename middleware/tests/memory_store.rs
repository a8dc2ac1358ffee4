//! The store contract suite against the memory store.

tower_idempotency::store_conformance_tests!(|| async { tower_idempotency::MemoryStore::new() });
