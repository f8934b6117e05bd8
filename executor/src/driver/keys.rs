//! The driver's view of the cache-key module ([`crate::keys`]): every
//! key and every text that enters one is made there; the driver only
//! resolves the inputs and calls it.

pub use crate::keys::*;
