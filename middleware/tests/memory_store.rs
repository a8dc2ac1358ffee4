//! The store contract suite against the memory store.

tower_idempotency::store_conformance_tests!(|| async { tower_idempotency::MemoryStore::new() });

mod model_ops;

mod model {
    use proptest::prelude::*;
    use tower_idempotency::MemoryStore;
    use tower_idempotency::conformance::check_model;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Random sequences of begin/complete/release/renew/expiry agree with the contract's
        /// model. The tokio clock is paused, so expiry costs no real time.
        #[test]
        fn the_memory_store_follows_the_contract_model(ops in super::model_ops::sequence(40)) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .expect("runtime");
            runtime.block_on(async { check_model(MemoryStore::new(), &ops).await });
        }
    }
}
