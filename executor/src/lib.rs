//! kiln-executor: turns a Dockerfile and a build context into an OCI image.
pub mod build;
pub mod cache;
pub mod cli;
pub mod context;
pub mod context_source;
pub mod dockerfile;
pub mod dockerignore;
pub mod driver;
pub mod erofs;
pub mod kaniko_flags;
pub mod log;
pub mod oci;
pub mod plan;
pub mod registry;
pub mod store;
pub mod tls_roots;
pub mod unpack;
