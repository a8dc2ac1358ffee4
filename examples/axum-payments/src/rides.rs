//! `POST /rides`: create the ride, charge the card, send the receipt, in three atomic phases
//! (brandur's rocket-rides-atomic). Each phase commits its rows together with a recovery point
//! (`checkpoint_in`); the last commits its rows together with the stored response
//! (`complete_in`). A run that crashes resumes, in the next attempt, after the last phase that
//! committed; a run that stalled and was taken over has its transaction refused and rolled back.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tower_idempotency::{CheckpointError, Lease, StoreError};

use crate::App;
use crate::pause::pause;
use crate::provider;

/// The request.
#[derive(Debug, Deserialize)]
pub struct NewRide {
    /// Where from.
    pub origin: String,
    /// Where to.
    pub destination: String,
    /// In cents.
    pub amount: i64,
}

/// The answer, stored with the receipt and replayed to every retry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Booked {
    /// `rides.id`.
    pub ride: i64,
    /// The processor's charge id.
    pub charge: String,
    /// `receipts.id`.
    pub receipt: i64,
    /// The run of the request that finished it (2 after one crash or takeover).
    pub attempt: u32,
    /// The recovery point that run started from (`start` for a fresh start).
    pub resumed_from: String,
}

/// How far earlier runs got: the last recovery point.
enum Phase {
    Start,
    RideCreated { ride: i64 },
    Charged { ride: i64, charge: String },
}

impl Phase {
    fn of(lease: &Lease) -> Result<Self, AppError> {
        let Some(point) = lease.recovery_point() else {
            return Ok(Self::Start);
        };
        let data = String::from_utf8_lossy(point.data());
        let corrupt = || AppError::Failed(format!("unreadable recovery point {point:?}"));
        match (point.name(), data.split_once(' ')) {
            ("ride_created", _) => Ok(Self::RideCreated {
                ride: data.parse().map_err(|_| corrupt())?,
            }),
            ("charged", Some((ride, charge))) => Ok(Self::Charged {
                ride: ride.parse().map_err(|_| corrupt())?,
                charge: charge.to_owned(),
            }),
            _ => Err(corrupt()),
        }
    }
}

/// The handler. Every pause is a test barrier (a no-op in a real deployment): the crash tests
/// kill the process at each one.
pub(crate) async fn book(
    State(app): State<App>,
    lease: Lease,
    Json(new): Json<NewRide>,
) -> Result<Response, AppError> {
    let token = i64::try_from(lease.token().0).map_err(|_| AppError::LeaseLost)?;
    let resumed_from = lease
        .recovery_point()
        .map_or("start", |point| point.name())
        .to_owned();
    let mut phase = Phase::of(&lease)?;
    pause("started").await;
    loop {
        phase = match phase {
            Phase::Start => {
                // Phase 1: the ride row and the recovery point commit together.
                let mut tx = app.pool.begin().await?;
                let ride: i64 = sqlx::query_scalar(
                    "INSERT INTO rides (origin, destination, amount, created_by) \
                     VALUES ($1, $2, $3, $4) RETURNING id",
                )
                .bind(&new.origin)
                .bind(&new.destination)
                .bind(new.amount)
                .bind(token)
                .fetch_one(&mut *tx)
                .await?;
                app.store
                    .checkpoint_in(&mut tx, &lease, "ride_created", ride.to_string())
                    .await?;
                pause("ride_inserted").await;
                tx.commit().await?;
                pause("ride_committed").await;
                Phase::RideCreated { ride }
            }
            Phase::RideCreated { ride } => {
                // Phase 2: a foreign call, made safe to repeat by the processor's own idempotency
                // key (derived from the ride, so every attempt sends the same one); then its
                // result and the recovery point commit together.
                let charge =
                    provider::charge(&app.pool, &format!("ride-{ride}"), new.amount).await?;
                pause("charge_requested").await;
                let mut tx = app.pool.begin().await?;
                sqlx::query("UPDATE rides SET charge_id = $1 WHERE id = $2")
                    .bind(&charge)
                    .bind(ride)
                    .execute(&mut *tx)
                    .await?;
                app.store
                    .checkpoint_in(&mut tx, &lease, "charged", format!("{ride} {charge}"))
                    .await?;
                pause("charge_recorded").await;
                tx.commit().await?;
                pause("charged").await;
                Phase::Charged { ride, charge }
            }
            Phase::Charged { ride, charge } => {
                // Phase 3: the receipt (an outbox row a mailer sends) and the stored response
                // commit together: the record completes in this transaction.
                let mut tx = app.pool.begin().await?;
                let receipt: i64 = sqlx::query_scalar(
                    "INSERT INTO receipts (ride_id, sent_by) VALUES ($1, $2) RETURNING id",
                )
                .bind(ride)
                .bind(token)
                .fetch_one(&mut *tx)
                .await?;
                pause("receipt_inserted").await;
                let booked = Booked {
                    ride,
                    charge,
                    receipt,
                    attempt: lease.attempt(),
                    resumed_from,
                };
                let body =
                    serde_json::to_vec(&booked).map_err(|e| AppError::Failed(e.to_string()))?;
                let response = Response::builder()
                    .status(StatusCode::CREATED)
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(body)
                    .map_err(|e| AppError::Failed(e.to_string()))?;
                let response: Response = app.store.complete_in(&mut tx, &lease, response).await?;
                pause("completed").await;
                tx.commit().await?;
                pause("committed").await;
                return Ok(response);
            }
        };
    }
}

/// Why a run stopped.
#[derive(Debug)]
pub(crate) enum AppError {
    /// A newer run holds the request (this one stalled past `lock_ttl`): its transaction rolled
    /// back, and the newer run's effects are the ones that count.
    LeaseLost,
    /// Anything else: the transaction rolled back; the layer releases the lease (a `5xx`).
    Failed(String),
}

impl From<StoreError> for AppError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::LeaseLost => Self::LeaseLost,
            other => Self::Failed(other.to_string()),
        }
    }
}

impl From<CheckpointError> for AppError {
    fn from(error: CheckpointError) -> Self {
        if error.is_lease_lost() {
            Self::LeaseLost
        } else {
            Self::Failed(error.to_string())
        }
    }
}

impl From<sqlx::Error> for AppError {
    fn from(error: sqlx::Error) -> Self {
        Self::Failed(error.to_string())
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let (status, detail) = match self {
            Self::LeaseLost => (
                StatusCode::CONFLICT,
                "a newer run of this request took it over; this run stopped and its uncommitted \
                 work was rolled back. Retry to get the result"
                    .to_owned(),
            ),
            Self::Failed(detail) => (StatusCode::INTERNAL_SERVER_ERROR, detail),
        };
        tracing::warn!(%status, detail, "ride not booked by this run");
        let body = serde_json::json!({
            "type": "about:blank",
            "title": status.canonical_reason(),
            "status": status.as_u16(),
            "detail": detail,
        });
        (
            status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body.to_string(),
        )
            .into_response()
    }
}
