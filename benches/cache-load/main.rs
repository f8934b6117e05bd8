//! cache-load: a small load generator for kiln-cache-server (hyper client).
//!
//! Measures single-key and 64-key batch lookups (requests/s, p50, p99) and
//! large blob PUT/GET throughput against a running server:
//!
//! ```sh
//! cache-load --server http://127.0.0.1:7070 [--duration 10] [--concurrency 32]
//!            [--blob-mb 100] [--blob-rounds 3] [--entries 10000] [--token T]
//! ```
//! Results are printed as a table; see docs/performance.md.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kiln_common::{CacheKey, Digest};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

struct Opts {
    server: String,
    token: Option<String>,
    duration: Duration,
    concurrency: usize,
    blob_mb: usize,
    blob_rounds: usize,
    entries: u64,
}

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        server: "http://127.0.0.1:7070".into(),
        token: std::env::var("KILN_CACHE_TOKEN").ok(),
        duration: Duration::from_secs(10),
        concurrency: 32,
        blob_mb: 100,
        blob_rounds: 3,
        entries: 10_000,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        let num = |v: String| v.parse::<u64>().map_err(|e| format!("{v}: {e}"));
        match flag.as_str() {
            "--server" => o.server = value()?,
            "--token" => o.token = Some(value()?),
            "--duration" => o.duration = Duration::from_secs(num(value()?)?),
            "--concurrency" => o.concurrency = num(value()?)? as usize,
            "--blob-mb" => o.blob_mb = num(value()?)? as usize,
            "--blob-rounds" => o.blob_rounds = num(value()?)? as usize,
            "--entries" => o.entries = num(value()?)?,
            "-h" | "--help" => {
                println!(
                    "cache-load --server URL [--token T] [--duration SECS] [--concurrency N] \
                     [--blob-mb MB] [--blob-rounds N] [--entries N]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(o)
}

fn key(i: u64) -> CacheKey {
    let mut raw = [0u8; 32];
    raw[..8].copy_from_slice(&i.to_be_bytes());
    raw[8..16].copy_from_slice(&0x6b69_6c6e_6c6f_6164_u64.to_be_bytes());
    CacheKey::from_bytes(raw)
}

async fn send(
    client: &HttpClient,
    opts: &Opts,
    method: Method,
    path: &str,
    body: Bytes,
) -> Result<(StatusCode, u64), String> {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("{}{}", opts.server, path))
        .header("content-type", "application/json");
    if let Some(t) = &opts.token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.map_err(|e| e.to_string())?.into_data() {
            n += data.len() as u64;
        }
    }
    Ok((status, n))
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx] as f64 / 1000.0
}

async fn lookup_phase(client: &HttpClient, opts: &'static Opts, batch: usize) -> (f64, f64, f64) {
    let deadline = Instant::now() + opts.duration;
    let mut workers = Vec::new();
    for w in 0..opts.concurrency {
        let client = client.clone();
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = w as u64 * 7919;
            while Instant::now() < deadline {
                let keys: Vec<String> = (0..batch)
                    .map(|j| key((i + j as u64 * 131) % (opts.entries * 2)).to_hex())
                    .collect();
                i = i.wrapping_add(batch as u64 * 31 + 1);
                let body =
                    serde_json::to_vec(&serde_json::json!({ "keys": keys })).unwrap_or_default();
                let start = Instant::now();
                match send(&client, opts, Method::POST, "/v1/lookup", body.into()).await {
                    Ok((StatusCode::OK, _)) => lat.push(start.elapsed().as_micros() as u32),
                    Ok((s, _)) => eprintln!("lookup: {s}"),
                    Err(e) => eprintln!("lookup: {e}"),
                }
            }
            lat
        }));
    }
    let started = Instant::now();
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap_or_default());
    }
    let secs = started.elapsed().as_secs_f64();
    all.sort_unstable();
    (
        all.len() as f64 / secs,
        percentile(&all, 0.5),
        percentile(&all, 0.99),
    )
}

fn pseudo_random(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out.into()
}

#[tokio::main]
async fn main() {
    let opts: &'static Opts = match parse_args() {
        Ok(o) => Box::leak(Box::new(o)),
        Err(e) => {
            eprintln!("cache-load: {e}");
            std::process::exit(2);
        }
    };
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(opts.concurrency * 2)
        .build(connector);

    // Seed entries (layer: null, so no blobs needed); half the looked-up
    // keys exist, half miss.
    let seed_start = Instant::now();
    let mut seeders = Vec::new();
    for w in 0..opts.concurrency as u64 {
        let client = client.clone();
        seeders.push(tokio::spawn(async move {
            let mut i = w;
            while i < opts.entries {
                let body = serde_json::json!({
                    "layer": null, "createdBy": format!("RUN load {i}"),
                    "created": "2026-11-24T00:00:00Z"
                });
                let path = format!("/v1/entries/{}", key(i).to_hex());
                if let Err(e) = send(
                    &client,
                    opts,
                    Method::PUT,
                    &path,
                    serde_json::to_vec(&body).unwrap_or_default().into(),
                )
                .await
                {
                    eprintln!("seed: {e}");
                }
                i += opts.concurrency as u64;
            }
        }));
    }
    for s in seeders {
        let _ = s.await;
    }
    println!(
        "seeded {} entries in {:.1}s (concurrency {})",
        opts.entries,
        seed_start.elapsed().as_secs_f64(),
        opts.concurrency
    );

    let (rps, p50, p99) = lookup_phase(&client, opts, 1).await;
    println!("single-key lookup: {rps:>9.0} req/s  p50 {p50:.2} ms  p99 {p99:.2} ms");
    let (rps, p50, p99) = lookup_phase(&client, opts, 64).await;
    println!(
        "64-key lookup:     {rps:>9.0} req/s ({:.0} keys/s)  p50 {p50:.2} ms  p99 {p99:.2} ms",
        rps * 64.0
    );

    let size = opts.blob_mb << 20;
    let mut digests = Vec::new();
    let mut put_total = 0.0;
    for round in 0..opts.blob_rounds {
        let data = pseudo_random(round as u64 + 1, size);
        let digest = Digest::of_bytes(&data);
        let start = Instant::now();
        match send(
            &client,
            opts,
            Method::PUT,
            &format!("/v1/blobs/{digest}"),
            data,
        )
        .await
        {
            Ok((s, _)) if s.is_success() => {}
            other => eprintln!("blob put: {other:?}"),
        }
        let secs = start.elapsed().as_secs_f64();
        put_total += secs;
        println!(
            "PUT {} MiB: {:.2} GB/s ({secs:.3}s)",
            opts.blob_mb,
            size as f64 / secs / 1e9
        );
        digests.push(digest);
    }
    let mut get_total = 0.0;
    for digest in &digests {
        let start = Instant::now();
        match send(
            &client,
            opts,
            Method::GET,
            &format!("/v1/blobs/{digest}"),
            Bytes::new(),
        )
        .await
        {
            Ok((StatusCode::OK, n)) if n == size as u64 => {}
            other => eprintln!("blob get: {other:?}"),
        }
        let secs = start.elapsed().as_secs_f64();
        get_total += secs;
        println!(
            "GET {} MiB: {:.2} GB/s ({secs:.3}s)",
            opts.blob_mb,
            size as f64 / secs / 1e9
        );
    }
    if !digests.is_empty() {
        let n = digests.len() as f64;
        println!(
            "blob PUT mean {:.2} GB/s, GET mean {:.2} GB/s",
            size as f64 * n / put_total / 1e9,
            size as f64 * n / get_total / 1e9
        );
    }
}
