#!/bin/sh
# Layer compression throughput: today's single-threaded gzip and zstd
# against kiln's all-core encoders (executor/src/build/compress.rs) on
# 64 MiB of incompressible data. Prints one line per encoder.
#
# usage: benches/e2e/compress.sh [MIB] [RUNS] [THREADS]
set -eu
cd "$(dirname "$0")/../.."
TARGET=${CARGO_TARGET_DIR:-target}
if [ -z "${BIN:-}" ]; then
  cargo build --release -p kiln-e2e --example compress_bench
  BIN="$TARGET/release/examples/compress_bench"
fi
echo "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
exec "$BIN" "$@"
