//! `simulator run`: a fleet of devices publishes readings to the gateway over MQTT, following
//! a profile, and (optionally) the sink is checked for every one of them.
//! `simulator bench`: the simulator's own ceiling, without a broker.
//!
//! Exit codes: 0 when everything was delivered (or nothing was checked), 1 when readings were
//! lost or verification timed out, 2 on usage errors and failed devices or connections.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use simulator::cli::{Cli, Command, RunArgs};
use simulator::config::Settings;
use simulator::{bench, fleet};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Bench(args) => bench::run(&args).and_then(|r| {
            bench::print(&r);
            write_report(args.report.as_deref(), &r)?;
            Ok(ExitCode::SUCCESS)
        }),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    // stdout is for the summary; logs go to stderr.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only for a terminal: a file or a pipe gets plain text.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn run(args: RunArgs) -> Result<ExitCode> {
    let settings = Settings::load(args.config.as_deref(), args.overrides())?;
    if args.print_settings {
        println!(
            "{}",
            serde_json::to_string_pretty(&settings).context("serialising the settings")?
        );
        return Ok(ExitCode::SUCCESS);
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    let summary = runtime.block_on(fleet::run(settings))?;
    summary.print();
    write_report(args.report.as_deref(), &summary)?;
    Ok(summary.exit_code())
}

fn write_report(path: Option<&std::path::Path>, value: &impl serde::Serialize) -> Result<()> {
    if let Some(path) = path {
        let json = serde_json::to_vec_pretty(value).context("serialising the report")?;
        std::fs::write(path, json)
            .with_context(|| format!("writing the report to {}", path.display()))?;
    }
    Ok(())
}
