//! Why an object-storage operation failed, and the class the API maps it
//! to.

use kiln_storage::{Classify, ContractError, ErrorClass};

/// Why an object-storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ObjError {
    #[error("object storage: {context}: {source}")]
    Store {
        context: String,
        #[source]
        source: object_store::Error,
    },
    /// The storage contract's refusals, the same as the local store's.
    #[error(transparent)]
    Contract(#[from] ContractError),
    #[error("{0}")]
    Conflict(String),
    #[error("local index cache: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt object {path}: {message}")]
    Corrupt { path: String, message: String },
    #[error("object storage settings: {0}")]
    Config(String),
}

impl Classify for ObjError {
    fn class(&self) -> ErrorClass {
        match self {
            ObjError::Contract(e) => e.class(),
            ObjError::Conflict(_) => ErrorClass::Conflict,
            // The bucket does not answer: an executor moves on to its next
            // cache server.
            ObjError::Store { .. } => ErrorClass::Unavailable,
            ObjError::Db(_)
            | ObjError::Io { .. }
            | ObjError::Corrupt { .. }
            | ObjError::Config(_) => ErrorClass::Internal,
        }
    }
}
