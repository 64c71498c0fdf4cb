//! What an image is, independent of where it comes from: the names users
//! give (references, digests, platforms), the JSON that describes an image
//! (manifests, indexes, configs), its verified manifest chain, and the image
//! files (OCI layouts, `docker save` archives) that carry it offline.
//!
//! Every other room speaks these types. It stands on `error` and `ui` (for
//! warnings); the image files hand their layers to [`crate::unpack`]'s pipeline.

pub(crate) mod compressed;
pub(crate) mod digest;
pub(crate) mod layout;
pub(crate) mod manifest;
pub(crate) mod platform;
pub(crate) mod reference;
pub(crate) mod resolve;
pub(crate) mod source;

pub use digest::{Digest, HashingReader};
pub use manifest::{Compression, Descriptor};
