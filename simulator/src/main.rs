//! `simulator run`: many devices publish readings to the gateway over MQTT, then (optionally)
//! the sink is checked for every one of them.
//!
//! Exit codes: 0 when everything was delivered (or nothing was checked), 1 when readings were
//! lost or verification timed out, 2 on usage errors and connection failures.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;
use simulator::device::{self, DeviceReport, Plan};
use simulator::verify::{self, Expected, Sink, Verification};
use tokio::task::JoinSet;

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Publish readings from simulated devices and optionally verify they reached the sink.
    Run(RunArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// MQTT broker host (the gateway's embedded broker).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// MQTT broker port. The gateway's embedded broker serves MQTT 5 on its own port (1884 by
    /// default).
    #[arg(long, default_value_t = 1883)]
    port: u16,
    /// Simulated devices, one MQTT connection each.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=99_999))]
    devices: u32,
    /// Messages per device.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    messages: u64,
    /// Readings per message; more than one makes the payload an array.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    readings_per_message: u32,
    /// Payload encoding; `mixed` alternates per message.
    #[arg(long, value_enum, default_value_t = FormatArg::Cbor)]
    format: FormatArg,
    /// MQTT QoS of every publish.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// MQTT protocol version; v5 also sends the payload's content type.
    #[arg(long, value_enum, default_value_t = ProtocolArg::V4)]
    protocol: ProtocolArg,
    /// Measurement, the last topic segment.
    #[arg(long, default_value = "env", value_parser = parse_measurement)]
    measurement: String,
    /// Topics are <topic-prefix>/<device>/<measurement>.
    #[arg(long, default_value = "telemetry", value_parser = parse_topic_prefix)]
    topic_prefix: String,
    /// Seed of the generated values; the same seed gives the same values.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Messages per second per device; 0 publishes as fast as the connection allows.
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    rate: f64,
    /// Tag `run` of every reading, so that verification finds only this run's data
    /// [default: <seed>-<unix ms>].
    #[arg(long, value_parser = parse_run_id)]
    run_id: Option<String>,
    /// Also write the summary as JSON to this file.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Verify against VictoriaMetrics at this base URL.
    #[arg(long, value_name = "URL", conflicts_with = "verify_influx")]
    verify_vm: Option<String>,
    /// Verify against InfluxDB 1.x at this base URL.
    #[arg(long, value_name = "URL")]
    verify_influx: Option<String>,
    /// InfluxDB 1.x database to verify in.
    #[arg(long, value_name = "NAME", default_value = "telemetry")]
    influx_db: String,
    /// How long to wait for every reading to show up in the sink.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    verify_timeout_secs: u64,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum FormatArg {
    Cbor,
    Json,
    Mixed,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ProtocolArg {
    V4,
    V5,
}

// The run id and measurement are written into InfluxQL and PromQL-style selectors unescaped,
// so they are held to characters that never need quoting there, in line protocol or in topics.
fn parse_run_id(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    ok.then(|| s.to_owned())
        .ok_or_else(|| "1 to 64 characters of A-Z, a-z, 0-9, '-', '_' or '.'".to_owned())
}

fn parse_measurement(s: &str) -> Result<String, String> {
    let ok = !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    ok.then(|| s.to_owned())
        .ok_or_else(|| "one or more of A-Z, a-z, 0-9 or '_'".to_owned())
}

fn parse_topic_prefix(s: &str) -> Result<String, String> {
    let ok =
        !s.is_empty() && !s.starts_with('/') && !s.ends_with('/') && !s.contains(['+', '#', '\0']);
    ok.then(|| s.to_owned())
        .ok_or_else(|| "a topic without wildcards (+, #) or a leading or trailing '/'".to_owned())
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 0.0 => Ok(r),
        _ => Err("a number of messages per second, 0 or more".to_owned()),
    }
}

/// What `--report` writes, and what the human-readable summary shows.
#[derive(Debug, Serialize)]
struct Summary {
    run_id: String,
    protocol: &'static str,
    format: &'static str,
    qos: u8,
    /// Timestamp of every device's first reading, ms since the epoch.
    start_ms: i64,
    devices: u32,
    devices_failed: u32,
    messages_sent: u64,
    readings_sent: u64,
    /// Acknowledged publishes; null at QoS 0.
    acked: Option<u64>,
    /// Publishes the broker answered with an MQTT 5 failure reason.
    rejected: u64,
    elapsed_secs: f64,
    messages_per_sec: f64,
    readings_per_sec: f64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    errors: Vec<DeviceError>,
    #[serde(flatten)]
    verification: Option<Verification>,
    #[serde(skip_serializing_if = "Option::is_none")]
    verification_error: Option<String>,
}

#[derive(Debug, Serialize)]
struct DeviceError {
    device: String,
    error: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Run(args) => runtime.block_on(run(args)),
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
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn run(args: RunArgs) -> Result<ExitCode> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("the clock is before 1970")?;
    // Whole seconds make the timestamps easy to read back: reading n of a device is at
    // <start>.nnn.
    let start_secs = i64::try_from(now.as_secs()).context("the clock is too far ahead")?;
    let start_ms = start_secs * 1000;
    // Milliseconds, not the rounded start: two runs in the same second must not share an id,
    // or each would count the other's points as its own.
    let run_id = args
        .run_id
        .clone()
        .unwrap_or_else(|| format!("{}-{}", args.seed, now.as_millis()));

    let readings_per_device = args.messages * u64::from(args.readings_per_message);
    // The gateway refuses readings more than max_future_skew (10 minutes by default) ahead of
    // its clock, and a device's readings are 1 ms apart from the start.
    if readings_per_device > 600_000 {
        tracing::warn!(
            readings_per_device,
            "readings are stamped 1 ms apart from the start; past 10 minutes ahead the gateway's \
             default max_future_skew refuses them"
        );
    }

    let plan = Arc::new(Plan {
        host: args.host.clone(),
        port: args.port,
        protocol: match args.protocol {
            ProtocolArg::V4 => device::Protocol::V4,
            ProtocolArg::V5 => device::Protocol::V5,
        },
        qos1: args.qos == 1,
        format: match args.format {
            FormatArg::Cbor => device::Format::Cbor,
            FormatArg::Json => device::Format::Json,
            FormatArg::Mixed => device::Format::Mixed,
        },
        messages: args.messages,
        readings_per_message: args.readings_per_message,
        measurement: args.measurement.clone(),
        topic_prefix: args.topic_prefix.clone(),
        run_id: run_id.clone(),
        start_ms,
        seed: args.seed,
        rate: args.rate,
    });
    tracing::info!(
        run_id,
        devices = args.devices,
        messages = args.messages,
        "publishing to {}:{}",
        args.host,
        args.port
    );

    let started = tokio::time::Instant::now();
    let mut tasks = JoinSet::new();
    for n in 1..=args.devices {
        tasks.spawn(device::run_device(Arc::clone(&plan), n));
    }
    let mut reports: Vec<DeviceReport> = Vec::with_capacity(args.devices as usize);
    while let Some(joined) = tasks.join_next().await {
        reports.push(joined.context("a device task panicked")?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    reports.sort_by_key(|r| r.index);

    let messages_sent: u64 = reports.iter().map(|r| r.published).sum();
    let readings_sent = messages_sent * u64::from(args.readings_per_message);
    let per_sec = |n: u64| {
        if elapsed > 0.0 {
            n as f64 / elapsed
        } else {
            0.0
        }
    };
    let errors: Vec<DeviceError> = reports
        .iter()
        .filter_map(|r| {
            r.error.as_ref().map(|e| DeviceError {
                device: r.device.clone(),
                error: e.clone(),
            })
        })
        .collect();
    let mut summary = Summary {
        run_id: run_id.clone(),
        protocol: match args.protocol {
            ProtocolArg::V4 => "v4",
            ProtocolArg::V5 => "v5",
        },
        format: match args.format {
            FormatArg::Cbor => "cbor",
            FormatArg::Json => "json",
            FormatArg::Mixed => "mixed",
        },
        qos: args.qos,
        start_ms,
        devices: args.devices,
        devices_failed: u32::try_from(errors.len()).unwrap_or(u32::MAX),
        messages_sent,
        readings_sent,
        acked: plan.qos1.then(|| reports.iter().map(|r| r.acked).sum()),
        rejected: reports.iter().map(|r| r.rejected).sum(),
        elapsed_secs: elapsed,
        messages_per_sec: per_sec(messages_sent),
        readings_per_sec: per_sec(readings_sent),
        errors,
        verification: None,
        verification_error: None,
    };

    let sink = match (&args.verify_vm, &args.verify_influx) {
        (Some(url), _) => Some(Sink::VictoriaMetrics { url: url.clone() }),
        (None, Some(url)) => Some(Sink::Influx1 {
            url: url.clone(),
            db: args.influx_db.clone(),
        }),
        (None, None) => None,
    };
    if let Some(sink) = &sink {
        // Only what actually went out is expected back. A device's published messages are
        // always its first ones, so a count per device is enough.
        let expected = Expected {
            start_ms,
            per_device: reports
                .iter()
                .map(|r| {
                    let n = r.published * u64::from(args.readings_per_message);
                    (r.device.clone(), n)
                })
                .collect(),
        };
        let query = verify::Query {
            measurement: &args.measurement,
            run_id: &run_id,
        };
        tracing::info!(expected = expected.total(), "verifying against {sink:?}");
        let timeout = Duration::from_secs(args.verify_timeout_secs);
        match verify::verify(sink, &query, &expected, timeout).await {
            Ok(v) => summary.verification = Some(v),
            Err(e) => summary.verification_error = Some(format!("{e:#}")),
        }
    }

    print_summary(&summary);
    if let Some(path) = &args.report {
        let json = serde_json::to_vec_pretty(&summary).context("serialising the report")?;
        std::fs::write(path, json)
            .with_context(|| format!("writing the report to {}", path.display()))?;
    }
    Ok(exit_code(&summary))
}

fn exit_code(s: &Summary) -> ExitCode {
    if s.devices_failed > 0 || s.verification_error.is_some() {
        ExitCode::from(2)
    } else if s
        .verification
        .as_ref()
        .is_some_and(|v| !v.verified || v.timed_out)
    {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn print_summary(s: &Summary) {
    println!(
        "run {}: {} devices, MQTT {}, QoS {}, {}",
        s.run_id, s.devices, s.protocol, s.qos, s.format
    );
    println!(
        "sent      {} messages, {} readings in {:.2} s ({:.0} msg/s, {:.0} readings/s)",
        s.messages_sent, s.readings_sent, s.elapsed_secs, s.messages_per_sec, s.readings_per_sec
    );
    if let Some(acked) = s.acked {
        println!("acked     {acked} of {}", s.messages_sent);
    }
    if s.rejected > 0 {
        println!("rejected  {}", s.rejected);
    }
    if s.devices_failed > 0 {
        println!("failed    {} devices", s.devices_failed);
        const SHOWN: usize = 5;
        for e in s.errors.iter().take(SHOWN) {
            println!("          {}: {}", e.device, e.error);
        }
        if s.errors.len() > SHOWN {
            println!("          ... and {} more", s.errors.len() - SHOWN);
        }
    }
    if let Some(v) = &s.verification {
        let verdict = match (v.verified, v.timed_out) {
            (true, _) => "OK",
            (false, true) => "FAILED (timed out)",
            (false, false) => "FAILED",
        };
        println!(
            "verified  found {} of {}, lost {}, duplicated {}: {verdict}",
            v.readings_found, v.expected_readings, v.lost, v.duplicated
        );
        // The full list is in the report; a screenful is enough to see the pattern.
        const SHOWN: usize = 10;
        for d in v.per_device.iter().take(SHOWN) {
            println!(
                "          {}: expected {}, found {}, duplicated {}",
                d.device, d.expected, d.found, d.duplicated
            );
        }
        if v.per_device.len() > SHOWN {
            println!(
                "          ... and {} more devices",
                v.per_device.len() - SHOWN
            );
        }
    }
    if let Some(e) = &s.verification_error {
        println!("verified  ERROR: {e}");
    }
}
