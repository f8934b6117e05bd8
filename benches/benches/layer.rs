//! Layer writing throughput: deterministic tar + sha256 (diff_id) +
//! compression (separate thread) + sha256 (digest) + file, for a 32 MiB
//! change of 64 files with text-like (compressible) content.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kiln_executor::build::layer::{Compression, LayerOptions, MtimePolicy, write_layer};
use kiln_executor::build::snapshot::{Change, ChangeEntry, ChangeKind};
use std::path::PathBuf;

const FILES: usize = 64;
const FILE_SIZE: usize = 512 * 1024;

fn layer(c: &mut Criterion) {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut entries = Vec::new();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for i in 0..FILES {
        // Words from a small vocabulary: compresses roughly like source code.
        let mut data = Vec::with_capacity(FILE_SIZE);
        while data.len() < FILE_SIZE {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let word = [
                "fn ", "let ", "mut ", "self", "();\n", "    ", "value", "0x1f", "{}", "=> ",
            ][(state % 10) as usize];
            data.extend_from_slice(word.as_bytes());
        }
        data.truncate(FILE_SIZE);
        let name = format!("f{i:02}");
        std::fs::write(src.path().join(&name), &data).unwrap();
        entries.push(ChangeEntry {
            path: PathBuf::from(&name),
            kind: ChangeKind::Write {
                source: src.path().join(&name),
                opaque: false,
            },
        });
    }
    let change = Change::new(entries, src.path());

    let mut group = c.benchmark_group("layer-32MiB");
    group.throughput(Throughput::Bytes((FILES * FILE_SIZE) as u64));
    group.sample_size(10);
    for (name, compression) in [
        ("tar-only", Compression::None),
        ("gzip-1", Compression::Gzip { level: 1 }),
        ("gzip-6", Compression::Gzip { level: 6 }),
        ("zstd-3", Compression::Zstd { level: 3 }),
    ] {
        let opts = LayerOptions {
            compression,
            mtime: MtimePolicy::Set(0),
            // Every core, as the executor compresses.
            threads: 0,
        };
        group.bench_function(name, |b| {
            b.iter(|| {
                let layer = write_layer(&change, &opts, out.path()).unwrap().unwrap();
                std::fs::remove_file(&layer.path).unwrap();
                layer.size
            })
        });
    }
    group.finish();
}

criterion_group!(benches, layer);
criterion_main!(benches);
