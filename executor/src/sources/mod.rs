//! What a build reads besides its base images: the build context and the
//! sources of remote ADD.
//!
//! - [`context_source`]: where the context comes from (`--context`: a
//!   directory, a tar archive, git, a bucket, HTTPS) and its materialisation
//!   as a directory.
//! - [`dockerignore`]: which of the context's files a build may see.
//! - [`context`]: the scanned context, COPY's source selection and the
//!   content digests that enter cache keys.
//! - [`remote`]: ADD from an HTTP(S) URL or a git repository, fetched once
//!   per build before keys are computed.
//!
//! Promises: nothing here lets a source name a file outside its context or
//! its fetched directory; every error names the source (path or URL).

pub mod context;
pub mod context_source;
pub mod dockerignore;
pub mod remote;
