//! The `gateway` command: run, generate-config, check-config.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gateway::config::{Config, LogFormat, DEFAULT_TOML};

#[derive(Parser)]
#[command(
    name = "gateway",
    version,
    about = "IoT telemetry gateway: MQTT in, InfluxDB out, nothing dropped silently"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway until SIGINT or SIGTERM.
    Run {
        /// TOML file over the built-in defaults; GATEWAY_<SECTION>__<KEY> variables override both.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print the documented default configuration.
    GenerateConfig,
    /// Load and validate the configuration, print it (secrets redacted), and exit.
    CheckConfig {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::GenerateConfig => {
            print!("{DEFAULT_TOML}");
            ExitCode::SUCCESS
        }
        Command::CheckConfig { config } => match Config::load(config.as_deref()) {
            Ok(c) => {
                println!("configuration is valid\n{c:#?}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Run { config } => {
            let config = match Config::load(config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            init_tracing(&config);
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(gateway::run(config, signal())) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_tracing(config: &Config) {
    use tracing_subscriber::EnvFilter;
    // Validated in Config::validate; RUST_LOG wins when set.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Completes on the first SIGINT or SIGTERM.
async fn signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        // Without signal handlers the process still stops on SIGTERM, just without a flush.
        _ => std::future::pending().await,
    }
}
