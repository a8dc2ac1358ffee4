//! Random operation sequences for the model-based contract check (`conformance::check_model`),
//! shared by the store test binaries that run it.

use proptest::prelude::*;
use tower_idempotency::conformance::{ModelOp, TokenChoice};

fn token() -> impl Strategy<Value = TokenChoice> {
    prop_oneof![
        4 => Just(TokenChoice::Latest),
        2 => (0u8..3).prop_map(TokenChoice::Earlier),
        1 => Just(TokenChoice::Bogus),
    ]
}

fn op() -> impl Strategy<Value = ModelOp> {
    let key = 0u8..3;
    prop_oneof![
        4 => (key.clone(), 0u8..2, any::<bool>())
            .prop_map(|(key, fingerprint, short)| ModelOp::Begin { key, fingerprint, short }),
        3 => (key.clone(), token(), any::<bool>(), any::<u8>())
            .prop_map(|(key, token, short, body)| ModelOp::Complete { key, token, short, body }),
        2 => (key.clone(), token()).prop_map(|(key, token)| ModelOp::Release { key, token }),
        2 => (key, token(), any::<bool>())
            .prop_map(|(key, token, short)| ModelOp::Renew { key, token, short }),
        1 => Just(ModelOp::Sleep),
    ]
}

/// Up to `longest` operations over three keys and two fingerprints, about one in twelve a sleep.
pub(crate) fn sequence(longest: usize) -> impl Strategy<Value = Vec<ModelOp>> {
    proptest::collection::vec(op(), 1..longest)
}
