//! kiln-executor: turns a Dockerfile and a build context into an OCI image.
pub mod blobs;
pub mod build;
pub mod cache;
pub mod cli;
pub mod dockerfile;
pub mod driver;
pub mod erofs;
pub mod kaniko_flags;
pub mod keys;
pub mod log;
pub mod oci;
pub mod plan;
pub mod registry;
pub mod sources;
pub mod store;
pub mod tls_roots;
