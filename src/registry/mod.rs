//! Talking to registries over the distribution API: HTTP with retries and
//! backoff, token auth, docker's credentials, and mirrors tried before the origin.
//!
//! Knows HTTP and the API, not what happens to the bytes: verifying and
//! storing blobs belongs to [`crate::blobs`].

pub mod auth;
pub mod client;
pub mod credentials;
