//! What a storage failure means to a caller, defined once for every
//! backend.
//!
//! - [`ContractError`]: the storage contract's refusals, the same for the
//!   local store and the object-store replica (bytes that do not hash to
//!   their digest, an entry naming a blob that is not there or has another
//!   size).
//! - [`ErrorClass`] and [`Classify`]: every backend error says which class
//!   it is in; the cache server's API turns a class into an HTTP status and
//!   error code in one place, and knows nothing else about a backend's
//!   errors.

use kiln_common::Digest;

/// The kinds of failure a caller can act on differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The request is malformed (a bad namespace, for example).
    Invalid,
    /// Uploaded bytes do not hash to the digest they were sent for.
    DigestMismatch,
    /// An entry names a blob that is not stored.
    MissingBlob,
    /// An entry's layer size differs from the stored blob's.
    SizeMismatch,
    /// Something else is stored and stays (first writer wins).
    Conflict,
    /// What was asked for is not there.
    NotFound,
    /// The volume or quota is full.
    Full,
    /// The storage does not answer (try again, or another server).
    Unavailable,
    /// A fault of the storage itself (I/O, a corrupt record).
    Internal,
}

/// An error that knows its [`ErrorClass`].
pub trait Classify {
    fn class(&self) -> ErrorClass;
}

/// The storage contract's refusals (docs/cache-api.md): the same text and
/// class from every backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContractError {
    #[error("uploaded content does not match its digest: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("the entry names blob {0}, which this cache does not have; upload it first")]
    MissingBlob(Digest),
    #[error(
        "the entry says blob {digest} has {entry_size} bytes, but the stored blob has {blob_size}"
    )]
    LayerSizeMismatch {
        digest: Digest,
        entry_size: u64,
        blob_size: u64,
    },
}

impl Classify for ContractError {
    fn class(&self) -> ErrorClass {
        match self {
            ContractError::DigestMismatch { .. } => ErrorClass::DigestMismatch,
            ContractError::MissingBlob(_) => ErrorClass::MissingBlob,
            ContractError::LayerSizeMismatch { .. } => ErrorClass::SizeMismatch,
        }
    }
}

impl Classify for crate::content::ContentError {
    fn class(&self) -> ErrorClass {
        use crate::content::ContentError as E;
        match self {
            E::Io { .. } if self.is_no_space() => ErrorClass::Full,
            E::Io { .. } => ErrorClass::Internal,
            E::DigestMismatch { .. } => ErrorClass::DigestMismatch,
            E::SizeMismatch { .. } => ErrorClass::SizeMismatch,
            E::NotFound(_) => ErrorClass::NotFound,
        }
    }
}
