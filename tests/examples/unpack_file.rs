//! Unpacks layer files (gzip, zstd or plain tar) in order into a directory
//! with kiln's unpacker and prints the time it took: the fallback path of
//! base materialization, without registry or build around it. Used by
//! `benches/e2e/fat-base.sh` and for `strace -c -f` measurements.
//!
//! usage: unpack_file ROOTFS_DIR LAYER...
//!        unpack_file --inflate LAYER     (only decompresses, with the same
//!                                         decoder: the floor of a cold base)

use std::time::Instant;

use anyhow::{Result, bail};
use kiln_executor::build::unpack::{UnpackOptions, apply_layers};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 3 && args[1] == "--inflate" {
        return inflate_only(std::path::Path::new(&args[2]));
    }
    if args.len() < 3 {
        bail!("usage: unpack_file ROOTFS_DIR LAYER...");
    }
    let root = std::path::PathBuf::from(&args[1]);
    std::fs::create_dir_all(&root)?;
    let layers: Vec<std::path::PathBuf> = args[2..].iter().map(Into::into).collect();
    let start = Instant::now();
    let stats = apply_layers(
        layers.iter().map(|p| (p.as_path(), None)),
        &root,
        &UnpackOptions::default(),
    )?;
    println!(
        "unpacked {} entries, {} MB in {:.2}s",
        stats.entries,
        stats.file_bytes / 1_000_000,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// kiln's decompression of one layer into nothing: what no materialization
/// of that layer can be faster than (a gzip member inflates on one core).
fn inflate_only(layer: &std::path::Path) -> Result<()> {
    use anyhow::Context;
    let file = std::fs::File::open(layer).with_context(|| layer.display().to_string())?;
    let start = Instant::now();
    let mut reader = kiln_executor::build::unpack::decompress(std::io::BufReader::new(file))?;
    let bytes = std::io::copy(&mut reader, &mut std::io::sink())
        .with_context(|| format!("decompressing {}", layer.display()))?;
    println!(
        "inflated {} MB in {:.2}s",
        bytes / 1_000_000,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
