//! What an image is, independent of where it comes from: the names users
//! give (references, digests, platforms), the JSON that describes an image
//! (manifests, indexes, configs), its verified manifest chain, and the image
//! files (OCI layouts, `docker save` archives) that carry it offline.
//!
//! Stands on nothing but [`crate::error`]: every other room speaks these types.

pub mod compressed;
pub mod digest;
pub mod layout;
pub mod manifest;
pub mod platform;
pub mod reference;
pub mod resolve;
pub mod source;
