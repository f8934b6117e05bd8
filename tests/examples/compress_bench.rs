//! Layer compression throughput: 64 MiB of incompressible bytes (the worst
//! case for time) compressed with today's single-threaded encoders and with
//! kiln's all-core ones (kiln_executor::build::compress), best of N runs.
//! Used by `benches/e2e/compress.sh`; numbers in docs/performance.md.
//!
//! usage: compress_bench [MIB] [RUNS] [THREADS]   (defaults 64, 3, all cores)

use std::io::Write;
use std::time::Instant;

use anyhow::Result;
use kiln_executor::build::compress::{ParallelGzip, default_threads, zstd_encoder};

fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Feeds `data` in 256 KiB writes, as the layer writer does.
fn feed(w: &mut impl Write, data: &[u8]) -> Result<()> {
    for chunk in data.chunks(256 * 1024) {
        w.write_all(chunk)?;
    }
    Ok(())
}

fn best(runs: usize, mut f: impl FnMut() -> Result<usize>) -> Result<(f64, usize)> {
    let mut best = f64::MAX;
    let mut size = 0;
    for _ in 0..runs {
        let t = Instant::now();
        size = f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok((best, size))
}

fn main() -> Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let mib = args.first().copied().unwrap_or(64);
    let runs = args.get(1).copied().unwrap_or(3);
    let threads = args.get(2).copied().unwrap_or_else(default_threads);
    let data = noise(mib << 20);
    let mb = data.len() as f64 / 1e6;
    let report = |name: &str, (secs, size): (f64, usize)| {
        println!(
            "{name:<34} {secs:>7.3} s {:>8.1} MB/s  ratio {:.3}",
            mb / secs,
            size as f64 / data.len() as f64
        );
    };
    println!("{mib} MiB incompressible input, best of {runs}, {threads} threads");
    for level in [1u32, 6] {
        report(
            &format!("gzip-{level} single thread (flate2)"),
            best(runs, || {
                let mut enc = flate2::GzBuilder::new()
                    .operating_system(255)
                    .write(Vec::new(), flate2::Compression::new(level));
                feed(&mut enc, &data)?;
                Ok(enc.finish()?.len())
            })?,
        );
        report(
            &format!("gzip-{level} parallel, {threads} threads"),
            best(runs, || {
                let mut enc = ParallelGzip::new(Vec::new(), level, threads)?;
                feed(&mut enc, &data)?;
                Ok(enc.finish()?.len())
            })?,
        );
    }
    report(
        "zstd-3 single thread",
        best(runs, || {
            let mut enc = zstd::Encoder::new(Vec::new(), 3)?;
            feed(&mut enc, &data)?;
            Ok(enc.finish()?.len())
        })?,
    );
    report(
        &format!("zstd-3 multithreaded, {threads} workers"),
        best(runs, || {
            let mut enc = zstd_encoder(Vec::new(), 3, threads)?;
            feed(&mut enc, &data)?;
            Ok(enc.finish()?.len())
        })?,
    );
    Ok(())
}
