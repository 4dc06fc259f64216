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
    /// Add a device to a credentials file, or change its password (argon2id hash). The password
    /// is the first line of standard input; a running gateway picks the change up by itself.
    Passwd {
        /// The credentials file (auth.credentials_file); created if missing.
        file: PathBuf,
        /// The device's name: its MQTT username and the {device} of its topics.
        device: String,
    },
    /// The dead-letter queue: list, show, replay or purge what could not be written.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
        /// The same configuration as `run` (it says where the queue and the sink are).
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long, global = true)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List the records, oldest first (works while the gateway runs).
    List,
    /// Show one record with its data.
    Show { id: String },
    /// Write records to the sink again; what cannot be written stays. Needs the queue's lock:
    /// stop the gateway first (it redrives retries_exhausted records by itself).
    Replay {
        ids: Vec<String>,
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        /// Say what would be replayed, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Records a second, at most.
        #[arg(long, default_value_t = 50)]
        rate: u32,
    },
    /// Delete records for good. Needs the queue's lock: stop the gateway first.
    Purge {
        ids: Vec<String>,
        #[arg(long, conflicts_with = "ids")]
        all: bool,
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
        Command::Passwd { file, device } => {
            let mut password = String::new();
            if let Err(e) = std::io::stdin().read_line(&mut password) {
                eprintln!("error: cannot read the password from standard input: {e}");
                return ExitCode::from(2);
            }
            let password = password.trim_end_matches(['\r', '\n']);
            if password.is_empty() {
                eprintln!("error: empty password (give it on standard input)");
                return ExitCode::from(2);
            }
            match gateway::ingest::guard::credentials::set_password(
                &file,
                &device,
                password.as_bytes(),
            ) {
                Ok(()) => {
                    println!("{device}: password set in {}", file.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Dlq {
            command,
            config,
            json,
        } => {
            let config = match Config::load(config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            dlq_command(&config, command, json)
        }
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

fn dlq_command(config: &Config, command: DlqCommand, json: bool) -> ExitCode {
    use gateway::replay::{self, Selection};
    let selection = |ids: Vec<String>, all: bool| {
        if all {
            Selection::All
        } else {
            Selection::Ids(ids)
        }
    };
    let result = match command {
        DlqCommand::List => replay::list(config).map(|records| {
            if json {
                print_json(&records);
            } else if records.is_empty() {
                println!(
                    "the dead-letter queue at {} is empty",
                    config.dlq.dir.display()
                );
            } else {
                println!(
                    "{:<16} {:<18} {:>8} {:>8}  {:<24}  {:<28}  REASON",
                    "ID", "KIND", "READINGS", "ATTEMPTS", "FIRST FAILURE", "TOPIC"
                );
                for r in &records {
                    let topic = r.topics.first().map_or("", String::as_str);
                    let reason: String = r.reason.chars().take(80).collect();
                    println!(
                        "{:<16} {:<18} {:>8} {:>8}  {:<24}  {:<28}  {}",
                        r.id,
                        r.kind.as_str(),
                        r.readings,
                        r.attempts,
                        r.first_failure,
                        topic,
                        reason
                    );
                }
                let readings: u64 = records.iter().map(|r| u64::from(r.readings)).sum();
                println!("{} records, {readings} readings", records.len());
            }
            ExitCode::SUCCESS
        }),
        DlqCommand::Show { id } => replay::show(config, &id).map(|shown| {
            if json {
                print_json(&shown);
            } else {
                let r = &shown.record;
                println!(
                    "id:            {}\nkind:          {}\nreadings:      {}\nattempts:      {}",
                    r.id,
                    r.kind.as_str(),
                    r.readings,
                    r.attempts
                );
                println!(
                    "first failure: {}\nlast failure:  {}\nstatus:        {}",
                    r.first_failure,
                    r.last_failure,
                    r.status.map_or("-".into(), |s| s.to_string())
                );
                println!(
                    "reason:        {}\ntopics:        {}{}",
                    r.reason,
                    r.topics.join(", "),
                    if r.more_topics > 0 {
                        format!(" and {} more", r.more_topics)
                    } else {
                        String::new()
                    }
                );
                match (&shown.data, &shown.data_hex) {
                    (Some(text), _) => println!("data:\n{text}"),
                    (None, Some(hex)) => println!("data (hex):\n{hex}"),
                    (None, None) => {}
                }
            }
            ExitCode::SUCCESS
        }),
        DlqCommand::Replay {
            ids,
            all,
            dry_run,
            rate,
        } => {
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(replay::replay(config, selection(ids, all), dry_run, rate)).map(|report| {
                if json {
                    print_json(&report);
                } else {
                    for l in &report.lines {
                        println!("{:<16} {:<18} {:>8}  {}{}", l.id, l.kind.as_str(), l.readings, l.outcome,
                            l.detail.as_ref().map_or(String::new(), |d| format!(": {d}")));
                    }
                    println!(
                        "{} records: {} readings written, {} parked again, {} records left in the queue",
                        report.records, report.written_readings, report.parked_again_readings, report.left
                    );
                }
                if report.left > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS }
            })
        }
        DlqCommand::Purge { ids, all } => {
            replay::purge(config, selection(ids, all)).map(|report| {
                if json {
                    print_json(&report);
                } else {
                    println!(
                        "purged {} records ({} readings)",
                        report.records, report.readings
                    );
                }
                ExitCode::SUCCESS
            })
        }
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })
}

fn print_json(value: &impl serde::Serialize) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("error: {e}"),
    }
}

fn init_tracing(config: &Config) {
    use tracing_subscriber::EnvFilter;
    // Validated in Config::validate; RUST_LOG wins when set.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.level));
    use std::io::IsTerminal;
    // Colours only for a person at a terminal, not in files or log shippers.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // rumqttd opens error-level spans for every publish it routes (with the topic formatted),
    // which a level filter cannot turn away: they cost the embedded broker about 5% of its
    // CPU. Its events (warnings, errors) still pass.
    let no_broker_spans = tracing_subscriber::filter::filter_fn(|meta| {
        !(meta.is_span() && meta.target().starts_with("rumqttd"))
    });
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    match config.log.format {
        LogFormat::Json => builder.json().finish().with(no_broker_spans).init(),
        LogFormat::Text => builder.finish().with(no_broker_spans).init(),
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
