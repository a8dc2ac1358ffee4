//! An axum payments API protected by tower-idempotency.
//!
//! ```text
//! cargo run -p axum-payments            # listens on 127.0.0.1:3000 (PORT to change)
//! curl -i -X POST localhost:3000/payments -H 'Idempotency-Key: 1' -H 'Authorization: Bearer alice' \
//!      -H 'Content-Type: application/json' -d '{"amount": 1000, "currency": "EUR"}'
//! ```
//!
//! Send the same request again: the response comes back with `Idempotent-Replayed: true` and
//! `GET /payments` still lists one payment. Change the body with the same key: `422`. Send it
//! twice at once: the second gets `409` while the first runs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tower_idempotency::{IdempotencyLayer, MemoryStore, Policy};

#[derive(Deserialize)]
struct NewPayment {
    amount: u64,
    currency: String,
}

#[derive(Clone, Serialize)]
struct Payment {
    id: String,
    amount: u64,
    currency: String,
}

type Payments = Arc<Mutex<Vec<Payment>>>;

async fn create(
    State(payments): State<Payments>,
    Json(new): Json<NewPayment>,
) -> (StatusCode, Json<Payment>) {
    // The slow, side-effecting part that must not happen twice.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut payments = payments
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let payment = Payment {
        id: format!("pay_{}", payments.len() + 1),
        amount: new.amount,
        currency: new.currency,
    };
    payments.push(payment.clone());
    (StatusCode::CREATED, Json(payment))
}

async fn list(State(payments): State<Payments>) -> Json<Vec<Payment>> {
    Json(
        payments
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone(),
    )
}

/// The app: payments require a key; responses are kept for a day.
fn app(store: MemoryStore) -> Router {
    let idempotency =
        IdempotencyLayer::new(store).route("/payments", Policy::default().with_required(true));
    Router::new()
        .route("/payments", post(create).get(list))
        .with_state(Payments::default())
        .layer(idempotency)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().init();
    let port = std::env::var("PORT").unwrap_or_else(|_| "3000".to_owned());
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    tracing::info!("payments API on http://{}", listener.local_addr()?);
    axum::serve(listener, app(MemoryStore::new())).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn payment(key: &str, body: &'static str) -> Request<Body> {
        Request::post("/payments")
            .header("idempotency-key", key)
            .header("content-type", "application/json")
            .body(Body::from(body))
            .expect("request")
    }

    #[tokio::test]
    async fn a_retried_payment_is_charged_once() {
        let app = app(MemoryStore::new());
        let body = r#"{"amount": 1000, "currency": "EUR"}"#;
        let first = app
            .clone()
            .oneshot(payment("k", body))
            .await
            .expect("first");
        assert_eq!(first.status(), StatusCode::CREATED);
        let retry = app
            .clone()
            .oneshot(payment("k", body))
            .await
            .expect("retry");
        assert_eq!(retry.headers()["idempotent-replayed"], "true");
        let list = app
            .oneshot(Request::get("/payments").body(Body::empty()).expect("list"))
            .await
            .expect("list");
        let payments = list.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(
            &payments[..],
            br#"[{"id":"pay_1","amount":1000,"currency":"EUR"}]"#
        );
    }

    #[tokio::test]
    async fn a_payment_without_a_key_is_refused() {
        let request = Request::post("/payments")
            .header("content-type", "application/json")
            .body(Body::from(r#"{"amount": 1, "currency": "EUR"}"#))
            .expect("request");
        let response = app(MemoryStore::new())
            .oneshot(request)
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    }
}
