//! The simulator's own ceiling: messages a second that one core can generate (values,
//! timestamps, CBOR or JSON) and encode as MQTT PUBLISH packets, with no broker and no
//! socket. A run cannot publish faster than this per core it is given.

use std::time::Instant;

use anyhow::Result;
use bytes::BytesMut;
use serde::Serialize;

use crate::cli::BenchArgs;
use crate::config::{Format, Protocol, Settings};
use crate::generate::Generator;

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub format: Format,
    pub protocol: Protocol,
    pub readings_per_message: u32,
    pub seconds: f64,
    pub messages: u64,
    pub messages_per_sec: f64,
    pub readings_per_sec: f64,
    /// Mean size of a PUBLISH packet, topic and payload included.
    pub bytes_per_message: f64,
}

/// Runs on the calling thread only, so the figure is per core.
pub fn run(args: &BenchArgs) -> Result<BenchReport> {
    let overrides = serde_json::json!({
        "fleet": {
            "format": args.format,
            "readings_per_message": args.readings_per_message,
        }
    });
    let settings = Settings::load(None, overrides)?;
    // Many devices, as in a real run, so that the per-device state is not always in cache.
    const DEVICES: u32 = 1000;
    let mut generators: Vec<Generator> = (1..=DEVICES)
        .map(|n| Generator::new(&settings, "bench", n, 0))
        .collect();
    let mut buf = BytesMut::with_capacity(4096);
    let start = Instant::now();
    let base_ms: i64 = 1_764_126_000_000;
    let mut messages: u64 = 0;
    let mut bytes: u64 = 0;
    let mut pkid: u16 = 0;
    // Checking the clock every message would be a measurable part of the work.
    loop {
        if messages.is_multiple_of(1024) && start.elapsed() >= args.duration {
            break;
        }
        let g = &mut generators[(messages % u64::from(DEVICES)) as usize];
        let now_ms = base_ms + (messages / u64::from(DEVICES)) as i64;
        let m = g.next(now_ms)?;
        pkid = pkid % 100 + 1;
        buf.clear();
        let written = match args.protocol {
            Protocol::V4 => {
                let mut p = rumqttc::Publish::new(m.topic, rumqttc::QoS::AtLeastOnce, m.payload);
                p.pkid = pkid;
                p.write(&mut buf).map_err(|e| anyhow::anyhow!("{e:?}"))?
            }
            Protocol::V5 => {
                use rumqttc::v5::mqttbytes::v5::{Publish, PublishProperties};
                let props = PublishProperties {
                    content_type: Some(m.encoding.content_type().to_owned()),
                    ..Default::default()
                };
                let mut p = Publish::new(
                    m.topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    m.payload,
                    Some(props),
                );
                p.pkid = pkid;
                p.write(&mut buf).map_err(|e| anyhow::anyhow!("{e:?}"))?;
                buf.len()
            }
        };
        bytes += written as u64;
        messages += 1;
    }
    let seconds = start.elapsed().as_secs_f64().max(f64::MIN_POSITIVE);
    let per_sec = messages as f64 / seconds;
    Ok(BenchReport {
        format: args.format,
        protocol: args.protocol,
        readings_per_message: args.readings_per_message,
        seconds,
        messages,
        messages_per_sec: per_sec,
        readings_per_sec: per_sec * f64::from(args.readings_per_message),
        bytes_per_message: bytes as f64 / messages.max(1) as f64,
    })
}

pub fn print(r: &BenchReport) {
    let label = |v: serde_json::Result<serde_json::Value>| match v {
        Ok(serde_json::Value::String(s)) => s,
        _ => "?".to_owned(),
    };
    println!(
        "bench: {} over MQTT {}, {} reading(s) per message, one core, no broker",
        label(serde_json::to_value(r.format)),
        label(serde_json::to_value(r.protocol)),
        r.readings_per_message
    );
    println!(
        "        {:.0} messages/s ({:.0} readings/s), {:.0} bytes per PUBLISH, {} messages in {:.2} s",
        r.messages_per_sec, r.readings_per_sec, r.bytes_per_message, r.messages, r.seconds
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bench_measures_something() {
        for (format, protocol) in [(Format::Cbor, Protocol::V4), (Format::Mixed, Protocol::V5)] {
            let args = BenchArgs {
                duration: Duration::from_millis(100),
                readings_per_message: 2,
                format,
                protocol,
                report: None,
            };
            let r = run(&args).expect("bench");
            assert!(r.messages >= 1024);
            assert!(r.bytes_per_message > 50.0, "{r:?}");
        }
    }
}
