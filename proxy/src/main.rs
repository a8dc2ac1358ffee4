//! The `idempotency-proxy` binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use idempotency_proxy::reload::ConfigFile;
use idempotency_proxy::{report, server, store, telemetry};

/// A reverse proxy that runs each keyed POST once and replays its response to retries.
#[derive(Debug, Parser)]
#[command(name = "idempotency-proxy", version, about)]
struct Cli {
    /// The TOML configuration file.
    #[arg(long, short, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the configuration and print the effective per-route policy.
    Check,
    /// Apply the store's schema (PostgreSQL, SQLite) and exit.
    Migrate,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_logging();
    let Some(path) = cli.config else {
        eprintln!("error: --config PATH is required (see examples/proxy.toml)");
        return ExitCode::from(2);
    };
    let (config, file) = match ConfigFile::load(&path) {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Check => match report::describe(&config) {
            Ok(text) => {
                for warning in report::warnings(&config) {
                    eprintln!("warning: {warning}");
                }
                println!("configuration ok: {}\n\n{text}", path.display());
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: {error}");
                ExitCode::from(2)
            }
        },
        Command::Migrate => runtime_block_on(None, async {
            match store::migrate(&config.store).await {
                Ok(done) => {
                    println!("{done}");
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("error: {error}");
                    ExitCode::FAILURE
                }
            }
        }),
        Command::Run => runtime_block_on(config.proxy.worker_threads, async {
            match server::run_reloading(config, file, server::shutdown_signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("error: {error}");
                    ExitCode::FAILURE
                }
            }
        }),
    }
}

fn runtime_block_on(
    worker_threads: Option<usize>,
    work: impl std::future::Future<Output = ExitCode>,
) -> ExitCode {
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = worker_threads {
        runtime.worker_threads(threads);
    }
    match runtime.enable_all().build() {
        Ok(runtime) => runtime.block_on(work),
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            ExitCode::FAILURE
        }
    }
}
