//! `chaos`: a chaos run of idempotency-proxy with a history checker.
//!
//! Starts three proxies (the real binary) on one store the run owns (PostgreSQL, Redis or a
//! Redis Cluster), a recording upstream, a client fleet that retries like real SDKs and a nemesis
//! on a seeded schedule; then checks the history: every key executed more than once must have a
//! fault GUARANTEES.md allows to cause it, every reply must be the right one. Exits 1 on a defect.
//!
//!     cargo run -p chaos -- --store all --duration 60s --rate 30 --seed 1

mod checker;
mod client;
mod clock;
mod history;
mod nemesis;
mod proxies;
mod report;
mod rng;
mod run;
mod schedule;
mod store;
mod upstream;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::history::History;
use crate::proxies::Timings;
use crate::store::StoreKind;

/// A chaos run of idempotency-proxy with a history checker.
#[derive(Debug, Parser)]
#[command(name = "chaos")]
struct Args {
    /// `postgres`, `redis`, `redis-cluster` or `all` (one run each, in turn).
    #[arg(long, default_value = "all")]
    store: String,
    /// How long each run lasts ("60s", "10m"), its quiet cooldown included.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Operations started per second.
    #[arg(long, default_value_t = 30)]
    rate: u64,
    /// Fixes the fault schedule and the requests: the same seed, the same run.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The proxy under test (the run builds nothing).
    #[arg(long, default_value = "target/debug/idempotency-proxy")]
    proxy_bin: PathBuf,
    /// Where the history and the verdict of each run go (JSON).
    #[arg(long, default_value = "target/chaos")]
    out: PathBuf,
    /// The proxies' lock_ttl: how long a crashed or paused holder keeps its keys.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    lock_ttl: Duration,
    /// The proxies' upstream_timeout.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    upstream_timeout: Duration,
    /// Store partitions drop the bytes they swallow instead of delivering them late (no real
    /// network does this; it shows what the store clients make of a stream with a gap).
    #[arg(long)]
    partition_drops_bytes: bool,
    /// Judge a recorded history file instead of running.
    #[arg(long)]
    check: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(main_async(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("chaos: {error}");
            ExitCode::from(2)
        }
    }
}

/// Ok(passed) or a failure to run at all.
async fn main_async(args: Args) -> Result<bool, String> {
    if let Some(path) = &args.check {
        let text = std::fs::read_to_string(path).map_err(|e| format!("read {path:?}: {e}"))?;
        let history: History =
            serde_json::from_str(&text).map_err(|e| format!("parse {path:?}: {e}"))?;
        let verdict = checker::check(&history);
        print!("{}", report::table(&verdict));
        return Ok(verdict.passed());
    }
    let stores: Vec<StoreKind> = if args.store == "all" {
        StoreKind::ALL.to_vec()
    } else {
        vec![args.store.parse()?]
    };
    if !args.proxy_bin.exists() {
        return Err(format!(
            "no proxy binary at {:?}: build it first (cargo build -p idempotency-proxy) or pass \
             --proxy-bin",
            args.proxy_bin
        ));
    }
    std::fs::create_dir_all(&args.out).map_err(|e| format!("create {:?}: {e}", args.out))?;
    let mut verdicts = Vec::new();
    for store in stores {
        let plan = run::Plan {
            store,
            seed: args.seed,
            duration: args.duration,
            rate: args.rate,
            proxy_binary: args.proxy_bin.clone(),
            timings: Timings {
                lock_ttl: args.lock_ttl,
                upstream_timeout: args.upstream_timeout,
                store_timeout: Duration::from_secs(1),
            },
            drop_bytes: args.partition_drops_bytes,
        };
        eprintln!(
            "chaos: {store}, seed {}, {:?} at {}/s",
            args.seed, args.duration, args.rate
        );
        let history = run::run(&plan).await?;
        let verdict = checker::check(&history);
        let name = format!("{store}-seed{}", args.seed);
        write_json(&args.out.join(format!("history-{name}.json")), &history)?;
        write_json(&args.out.join(format!("verdict-{name}.json")), &verdict)?;
        print!("{}", report::table(&verdict));
        if !verdict.passed() {
            println!(
                "reproduce: cargo run -p chaos -- --store {store} --seed {} --duration {} --rate \
                 {} (history in {:?})",
                args.seed,
                humantime::format_duration(args.duration),
                args.rate,
                args.out.join(format!("history-{name}.json"))
            );
        }
        verdicts.push(verdict);
    }
    println!("\n{}", report::summary(&verdicts));
    Ok(verdicts.iter().all(checker::Verdict::passed))
}

fn write_json(path: &std::path::Path, value: &impl serde::Serialize) -> Result<(), String> {
    let text = serde_json::to_string(value).map_err(|e| format!("serialize: {e}"))?;
    std::fs::write(path, text).map_err(|e| format!("write {path:?}: {e}"))
}
