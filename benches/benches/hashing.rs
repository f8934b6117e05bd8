use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kiln_common::{CacheKeyBuilder, Sha256Writer};
use std::io::Write;

fn hashing(c: &mut Criterion) {
    let data = vec![0xa5u8; 8 << 20];
    let mut group = c.benchmark_group("hash-8MiB");
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.bench_function("sha256", |b| {
        b.iter(|| {
            let mut w = Sha256Writer::new(std::io::sink());
            w.write_all(&data).unwrap();
            w.finish().1
        })
    });
    group.bench_function("blake3", |b| b.iter(|| blake3::hash(&data)));
    group.finish();

    c.bench_function("cache-key-run-step", |b| {
        let parent = CacheKeyBuilder::new().str("base", "sha256:abc").finish();
        let env: Vec<(String, String)> = (0..20)
            .map(|i| (format!("K{i}"), format!("v{i}")))
            .collect();
        b.iter(|| {
            CacheKeyBuilder::new()
                .key("parent", &parent)
                .str(
                    "instruction",
                    "RUN apt-get update && apt-get install -y build-essential",
                )
                .pairs("env", &env)
                .finish()
        })
    });
}

criterion_group!(benches, hashing);
criterion_main!(benches);
