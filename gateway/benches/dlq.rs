//! Dead-letter queue appends, each fsynced before it returns (the durability promise), and
//! replay reads. Run with `cargo bench -p gateway --bench dlq`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use gateway::dlq::{options_for, Dlq, Kind, Meta, Options};

fn meta(readings: u32) -> Meta {
    Meta {
        kind: Kind::RetriesExhausted,
        reason: "503: unavailable".into(),
        status: Some(503),
        attempts: 5,
        first_failure_ms: 0,
        last_failure_ms: 0,
        topics: vec!["telemetry/dev-00001/env".into()],
        more_topics: 0,
        readings,
        content_type: None,
    }
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tmp");
    let options = options_for(64 << 30, 64 << 20);
    let (mut q, _) = Dlq::open(dir.path(), options, true).expect("open");
    let mut group = c.benchmark_group("dlq");
    group.sample_size(20);
    // A 5,000-line batch of ~60-byte lines, the default batch size.
    for (name, lines) in [("append/1-line", 1usize), ("append/5000-lines", 5000)] {
        let data = "env,device=dev-00001 v=21.5 1764126000000000000\n"
            .repeat(lines)
            .into_bytes();
        group.throughput(Throughput::Bytes(data.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| q.append(&meta(lines as u32), &data).expect("append"))
        });
    }
    let id = q.entries().last().expect("a record").id.clone();
    group.bench_function("read/5000-lines", |b| {
        b.iter_batched(
            || id.clone(),
            |id| q.read(&id).expect("read"),
            BatchSize::SmallInput,
        )
    });

    // The spill buffer: the same log without the per-append fsync, in records of 4 MiB.
    let spill_dir = tempfile::tempdir().expect("tmp");
    let spill_options = Options {
        sync: false,
        ..options_for(64 << 30, 64 << 20)
    };
    let (mut spill, _) = Dlq::open(spill_dir.path(), spill_options, true).expect("open");
    let line = "env,device=dev-00001 v=21.5 1764126000000000000\n";
    let lines = (4 << 20) / line.len();
    let data = line.repeat(lines).into_bytes();
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.bench_function("spill/append-4MiB", |b| {
        b.iter(|| spill.append(&meta(lines as u32), &data).expect("append"))
    });
    let id = spill.entries().last().expect("a record").id.clone();
    group.bench_function("spill/read-4MiB", |b| {
        b.iter_batched(
            || id.clone(),
            |id| spill.read(&id).expect("read"),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
