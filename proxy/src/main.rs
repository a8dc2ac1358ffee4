//! The `idempotency-proxy` binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use idempotency_proxy::reload::ConfigFile;
use idempotency_proxy::{records, report, server, store, telemetry};

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
    /// Inspect or forget the record of one idempotency key.
    Records {
        #[command(subcommand)]
        action: RecordsAction,
    },
}

#[derive(Debug, Subcommand)]
enum RecordsAction {
    /// Print the key's record as JSON (never the body unless --body).
    Show {
        #[command(flatten)]
        request: RecordRequest,
        /// Include the stored response body.
        #[arg(long)]
        body: bool,
    },
    /// Delete the key's completed record (with --force, end its in-flight lease too).
    Forget {
        #[command(flatten)]
        request: RecordRequest,
        /// Also end an in-flight lease (a stuck request): its holder can no longer complete it.
        #[arg(long)]
        force: bool,
    },
}

/// The request whose record is meant, as the client sent it.
#[derive(Debug, clap::Args)]
struct RecordRequest {
    /// The idempotency key as sent (quoted or not).
    #[arg(long)]
    key: String,
    /// A request header that identifies the caller, `Name: value` (repeatable).
    #[arg(long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// A request cookie that identifies the caller, `name=value` (repeatable).
    #[arg(long = "cookie", value_name = "NAME=VALUE")]
    cookies: Vec<String>,
    /// The request path, which picks the route policy (default: the default policy).
    #[arg(long)]
    path: Option<String>,
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
        Command::Records { action } => runtime_block_on(None, run_records(config, action)),
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

async fn run_records(config: idempotency_proxy::config::Config, action: RecordsAction) -> ExitCode {
    let (request, body, force) = match action {
        RecordsAction::Show { request, body } => (request, body, None),
        RecordsAction::Forget { request, force } => (request, false, Some(force)),
    };
    let credentials = match records::credentials(&request.headers, &request.cookies) {
        Ok(credentials) => credentials,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    let store = match store::open(&config.store).await {
        Ok(store) => store,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    let handle = match records::records(&config, store, request.path.is_some()) {
        Ok(handle) => handle,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    let path = request.path.as_deref().unwrap_or("/");
    let output = match force {
        None => handle
            .inspect(path, &credentials, &request.key)
            .await
            .map(|info| records::record_json(&request.key, info.as_ref(), body)),
        Some(force) => handle
            .forget(path, &credentials, &request.key, force)
            .await
            .map(|forgotten| records::forgotten_json(&request.key, forgotten)),
    };
    match output {
        Ok(json) => {
            println!("{json:#}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            if records::is_bad_input(&error) {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
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
