//! The per-reading hot path: decode (CBOR, JSON) straight into line protocol, and the encoder
//! alone. Run with `cargo bench -p gateway --bench hot_path`.

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use gateway::decode::{Decoder, Limits, TopicPattern};
use gateway::line_protocol::{self, FieldValue};

const NOW: i64 = 1_764_126_000_000_000_000;

fn reading_json(i: i64) -> serde_json::Value {
    serde_json::json!({
        "ts": 1_764_126_000_000i64 + i,
        "fields": {"temp": 21.5, "hum": 40, "pressure": 1013.25, "battery": 3.71, "door": false, "co2": 415.5},
        "tags": {"site": "north", "room": "lab-2", "firmware": "1.4.2", "zone": "building-7/f3"},
    })
}

/// The simulator's reading, as `./scripts/bench.sh` sends it: two float fields and one tag.
fn reading_sim(i: i64) -> serde_json::Value {
    serde_json::json!({
        "ts": 1_764_126_000_000i64 + i,
        "fields": {"value": 21.0 + (i % 997) as f64 / 1000.0, "seq": i as f64},
        "tags": {"run": "embedded-100-8000-3"},
    })
}

fn cbor(value: &serde_json::Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).expect("CBOR encodes");
    out
}

fn decoder() -> Decoder {
    let limits = Limits {
        max_age_ns: 0,
        max_future_skew_ns: 0,
        ..Limits::default()
    };
    Decoder::new(
        limits,
        TopicPattern::parse("telemetry/{device}/{measurement}").expect("valid"),
    )
}

fn bench(c: &mut Criterion) {
    let one_cbor = cbor(&reading_json(0));
    let one_json = serde_json::to_vec(&reading_json(0)).expect("json");
    let hundred: Vec<serde_json::Value> = (0..100).map(reading_json).collect();
    let hundred_cbor = cbor(&serde_json::Value::Array(hundred.clone()));
    let hundred_json = serde_json::to_vec(&hundred).expect("json");
    let sim: Vec<serde_json::Value> = (0..100).map(reading_sim).collect();
    let sim_cbor = cbor(&serde_json::Value::Array(sim));
    eprintln!(
        "one CBOR reading: {} bytes; one JSON reading: {} bytes",
        one_cbor.len(),
        one_json.len()
    );

    let mut group = c.benchmark_group("decode+encode");
    for (name, payload, readings) in [
        ("cbor/1", &one_cbor, 1u64),
        ("json/1", &one_json, 1),
        ("cbor/100", &hundred_cbor, 100),
        ("json/100", &hundred_json, 100),
        ("cbor/100-simulator", &sim_cbor, 100),
    ] {
        group.throughput(Throughput::Elements(readings));
        let mut d = decoder();
        let mut out = Vec::with_capacity(64 * 1024);
        group.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                let o = d
                    .decode(
                        "telemetry/dev-00042/env",
                        black_box(payload),
                        None,
                        NOW,
                        &mut out,
                    )
                    .expect("valid payload");
                black_box(o.accepted)
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(1));
    group.bench_function("line/1", |b| {
        b.iter_batched_ref(
            || Vec::with_capacity(256),
            |out| {
                line_protocol::push_measurement(out, "env");
                line_protocol::push_tag(out, "device", "dev-00042");
                line_protocol::push_tag(out, "room", "lab-2");
                line_protocol::push_tag(out, "site", "north");
                out.push(b' ');
                line_protocol::push_field(out, true, "battery", FieldValue::Float(3.71));
                line_protocol::push_field(out, false, "door", FieldValue::Bool(false));
                line_protocol::push_field(out, false, "hum", FieldValue::Float(40.0));
                line_protocol::push_field(out, false, "pressure", FieldValue::Float(1013.25));
                line_protocol::push_field(out, false, "temp", FieldValue::Float(21.5));
                line_protocol::push_timestamp(out, black_box(NOW));
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
