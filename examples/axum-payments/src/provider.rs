//! The card processor, a system of its own: it runs each charge once per idempotency key, the
//! way Stripe does, and knows nothing of our transactions.
//!
//! It lives in a table (`provider_charges`) so the tests can count its charges; it is written in
//! autocommit, never in the handler's transaction, as a remote API call would be.

use sqlx::PgPool;

/// Charges `amount` once per `idempotency_key`: a repeated call returns the first charge's id.
pub(crate) async fn charge(
    pool: &PgPool,
    idempotency_key: &str,
    amount: i64,
) -> sqlx::Result<String> {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO provider_charges (idempotency_key, amount) VALUES ($1, $2) \
         ON CONFLICT (idempotency_key) DO UPDATE SET idempotency_key = excluded.idempotency_key \
         RETURNING id",
    )
    .bind(idempotency_key)
    .bind(amount)
    .fetch_one(pool)
    .await?;
    Ok(format!("ch_{id}"))
}
