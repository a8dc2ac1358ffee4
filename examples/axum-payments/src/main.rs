//! ```text
//! cargo run -p axum-payments        # 127.0.0.1:3000 (PORT), DATABASE_URL, PAYMENTS_SCHEMA
//! curl -i -X POST localhost:3000/rides -H 'Idempotency-Key: 1' -H 'Authorization: Bearer alice' \
//!      -H 'Content-Type: application/json' \
//!      -d '{"origin": "Gare du Nord", "destination": "Orly", "amount": 4200}'
//! ```
//!
//! Environment: `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`),
//! `PAYMENTS_SCHEMA` (default `payments`), `PORT` (default 3000; 0 picks a free one),
//! `LOCK_TTL_MS` (default 30000), `RUST_LOG` (default `info`). Once it accepts requests it prints `listening on <url>` on
//! stdout, the line its tests wait for.

use std::time::Duration;

use axum_payments::App;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let var =
        |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
    let url = var("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test");
    let schema = var("PAYMENTS_SCHEMA", "payments");
    let lock_ttl = Duration::from_millis(var("LOCK_TTL_MS", "30000").parse()?);
    let app = App::connect(&url, &schema).await?;
    let listener =
        tokio::net::TcpListener::bind(format!("127.0.0.1:{}", var("PORT", "3000"))).await?;
    // The tests start the app on port 0 and learn the port from this line: a port picked
    // beforehand could be taken by another process before the app binds it.
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app.router(lock_ttl)).await?;
    Ok(())
}
