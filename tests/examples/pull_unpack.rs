//! Pulls an image with kiln's registry client into a local store and
//! unpacks its layers into a directory; prints the time of each phase.
//! Used by `benches/e2e/pull-unpack.sh` (run under `/usr/bin/time -v`).
//!
//! usage: pull_unpack IMAGE ROOTFS_DIR STORE_DIR [INSECURE_REGISTRY]

use std::time::Instant;

use anyhow::{Context, Result, bail};
use kiln_executor::build::unpack::{UnpackOptions, apply_layers};
use kiln_executor::oci::Platform;
use kiln_executor::registry::{ImageRef, RegistryClient, RegistryOptions};
use kiln_executor::store::LocalStore;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        bail!("usage: pull_unpack IMAGE ROOTFS_DIR STORE_DIR [INSECURE_REGISTRY]");
    }
    let image = ImageRef::parse(&args[1])?;
    let root = std::path::PathBuf::from(&args[2]);
    let store = LocalStore::new(&args[3])?;
    let opts = RegistryOptions {
        insecure_registries: args.get(4).into_iter().cloned().collect(),
        ..Default::default()
    };
    let client = RegistryClient::new(opts)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;

    let start = Instant::now();
    let pulled = rt
        .block_on(client.pull(&image, &Platform::host(), &store))
        .with_context(|| format!("pulling {image}"))?;
    let pulled_at = start.elapsed();

    std::fs::create_dir_all(&root)?;
    let paths: Vec<_> = pulled
        .image
        .manifest
        .layers
        .iter()
        .map(|l| store.path(&l.digest))
        .collect();
    let diff_ids = &pulled.image.config.rootfs.diff_ids;
    let stats = apply_layers(
        paths
            .iter()
            .map(|p| p.as_path())
            .zip(diff_ids.iter().map(Some)),
        &root,
        &UnpackOptions::default(),
    )?;
    let total = start.elapsed();
    println!(
        "pulled {} ({} layers) in {:.2}s; unpacked {} entries, {} MB in {:.2}s; total {:.2}s",
        pulled.reference,
        paths.len(),
        pulled_at.as_secs_f64(),
        stats.entries,
        stats.file_bytes / 1_000_000,
        (total - pulled_at).as_secs_f64(),
        total.as_secs_f64()
    );
    Ok(())
}
