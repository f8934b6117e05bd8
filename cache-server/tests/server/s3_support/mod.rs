//! The S3 test harness for the object-storage tests: the processes (an
//! S3-compatible server with one bucket, `kiln-cache-server` replicas on it)
//! come from `kiln_e2e::s3`, shared with the workspace's end-to-end tests;
//! this module adds what needs the cache server's own crate, a client of the
//! test bucket for looking inside it ([`S3Server::bucket`],
//! [`S3Server::keys`]).
//!
//! When no S3-compatible server is installed the tests skip with a loud
//! message, unless `KILN_REQUIRE_S3` is set (CI sets it after installing),
//! in which case they fail.

#![allow(dead_code, unused_imports)]

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use kiln_cache_server::objstore::Bucket;
use object_store::aws::AmazonS3Builder;

pub use kiln_e2e::s3::{ACCESS_KEY, BUCKET, REGION, Replica, SECRET_KEY, s3s_binary};

/// This package's server binary, as cargo built it for the tests.
pub const SERVER: &str = env!("CARGO_BIN_EXE_kiln-cache-server");

/// A running S3-compatible server with one empty bucket (see
/// `kiln_e2e::s3::S3Server`, which it derefs to), plus bucket helpers.
pub struct S3Server {
    server: kiln_e2e::s3::S3Server,
    /// `http://127.0.0.1:PORT` of the S3 API.
    pub endpoint: String,
}

impl S3Server {
    /// Starts the server, or returns `None` (after saying so loudly) when it
    /// is not installed and `KILN_REQUIRE_S3` is unset.
    pub fn start(test: &str) -> Option<S3Server> {
        let server = kiln_e2e::s3::S3Server::start(test)?;
        Some(S3Server {
            endpoint: server.endpoint().to_owned(),
            server,
        })
    }

    /// A client of the test bucket under `prefix`, for looking inside.
    /// A three-node Garage cluster instead of s3s-fs (see
    /// [`kiln_e2e::s3::S3Server::start_garage`]).
    pub fn start_garage(test: &str) -> Option<S3Server> {
        let server = kiln_e2e::s3::S3Server::start_garage(test)?;
        Some(S3Server {
            endpoint: server.endpoint().to_owned(),
            server,
        })
    }

    pub fn bucket(&self, prefix: &str) -> Bucket {
        let s3 = AmazonS3Builder::new()
            .with_bucket_name(self.bucket_name())
            .with_endpoint(self.server.endpoint())
            .with_allow_http(true)
            .with_region(self.region())
            .with_access_key_id(self.access_key())
            .with_secret_access_key(self.secret_key())
            .build()
            .unwrap();
        Bucket::new(Arc::new(s3), prefix, 5 << 20)
    }

    /// Object keys in the bucket (relative to the bucket), sorted.
    pub async fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .bucket("")
            .list_all()
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.location.to_string())
            .collect();
        keys.sort();
        keys
    }
}

impl Deref for S3Server {
    type Target = kiln_e2e::s3::S3Server;

    fn deref(&self) -> &Self::Target {
        &self.server
    }
}

impl DerefMut for S3Server {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.server
    }
}
