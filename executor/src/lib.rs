//! kiln-executor: turns a Dockerfile and a build context into an OCI image.
pub mod dockerfile;
pub mod dockerignore;
pub mod plan;
pub mod cli;
pub mod build;
pub mod cache;
pub mod context;
pub mod driver;
pub mod oci;
pub mod registry;
pub mod store;
pub mod unpack;
