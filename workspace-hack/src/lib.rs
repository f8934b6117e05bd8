//! Nothing to call: this crate exists for its `Cargo.toml`, which asks for
//! the union of the features the workspace's dependencies are built with, so
//! that `cargo build --bins`, `cargo build -p kiln-executor` and
//! `cargo test` compile each dependency once (docs/decisions.md, "One
//! feature set per dependency").
