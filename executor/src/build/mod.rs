//! The build engine's building blocks: everything between "a rootfs made of
//! unpacked layers" and "a new layer blob plus an image config".
//!
//! - [`unpack`]: applies image layers to a directory (whiteouts, hostile
//!   entries refused) or lays them out as overlay lowers.
//! - [`copy`]: COPY and ADD into a step's rootfs, with Docker's destination
//!   rules, never writing outside it.
//! - [`runner`]: runs one RUN step in a rootfs ([`runner::Runner`], with the
//!   `chroot` and `none` isolations).
//! - [`snapshot`]: gives a writable rootfs over read-only layers and reports
//!   what a step changed ([`snapshot::Snapshotter`], with `overlay` and `walk`).
//! - [`layer`]: turns a [`snapshot::Change`] into a deterministic, compressed
//!   layer blob with its digest and diff_id, in one streaming pass.
//! - [`compress`]: gzip and zstd on all cores, with bytes that do not depend
//!   on the thread count.
//! - [`config`]: the OCI image config, edited the way Docker applies metadata
//!   instructions.
//! - [`user`]: `user[:group]` resolution against a rootfs's passwd and group.
//!
//! The build driver combines them without knowing which implementation of a
//! trait it holds; see docs/build-engine.md.

pub mod compress;
pub mod config;
pub mod copy;
pub mod fsutil;
pub mod layer;
pub mod runner;
pub mod snapshot;
pub mod unpack;
pub mod user;
