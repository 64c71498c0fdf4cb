//! Verified content-addressed blobs: the store that names a blob only once
//! its digest and size matched (the cache, or a run's private store), and the
//! concurrent downloads that fill it while the unpack pipeline reads.

pub mod download;
pub mod store;
