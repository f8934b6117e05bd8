//! kiln-common: the vocabulary shared by the executor and the cache server.
//!
//! - [`digest`]: OCI content digests (`sha256:<hex>`), streaming hashers and a
//!   reader that refuses to finish when the bytes do not match.
//! - [`cache_key`]: versioned, domain-separated blake3 cache keys.
//! - [`wire`]: the JSON types of the cache server's HTTP API, data plane
//!   and admin.
//! - [`errors`]: error chains, each cause once (the binaries' one-line
//!   reports), and certificate problems as cache clients report them.

pub mod cache_key;
pub mod digest;
pub mod errors;
pub mod wire;

pub use cache_key::{CacheKey, CacheKeyBuilder};
pub use digest::{Digest, DigestError, Sha256Writer, VerifyingReader};
pub use errors::chain as error_report;
pub use wire::{
    BlobPutResponse, CacheEntry, ErrorBody, ErrorDetail, LayerDescriptor, LookupRequest,
    LookupResponse,
};
