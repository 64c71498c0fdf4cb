//! SHA-256 hashes as Nix writes them.
//!
//! The Nix database stores a path's NAR hash as `sha256:<64 hex>` while Nix
//! prints it as `sha256:<52 nix32>` (`nix-store -q --hash`, "was modified!"
//! messages) and newer tools use SRI (`sha256-<base64>`). hydrafy compares
//! hashes across databases written by different Nix versions, so it parses
//! every notation into bytes and compares those, and it prints nix32 so that
//! its messages can be checked against `nix-store` output.
//!
//! nix32 is not RFC 4648 base32: it has its own 32-letter alphabet (no `e`,
//! `o`, `u`, `t`) and reads the hash from its last bit backwards, so no crate
//! for ordinary base32 can do it.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;

/// Nix's base-32 alphabet.
const NIX32: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Length of a sha256 hash in nix32 characters.
const NIX32_LEN: usize = (32 * 8 - 1) / 5 + 1;

/// A SHA-256 hash, as found in a Nix database or printed by Nix.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct NixHash(pub [u8; 32]);

impl NixHash {
    /// `sha256:<nix32>`, as `nix-store -q --hash` prints it.
    pub fn to_nix32(self) -> String {
        format!("sha256:{}", nix32_encode(&self.0))
    }
}

impl fmt::Display for NixHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_nix32())
    }
}

impl fmt::Debug for NixHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NixHash({})", self.to_nix32())
    }
}

/// Why a hash string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashParseError {
    #[error("only sha256 hashes are supported, not {0:?}")]
    Algorithm(String),
    #[error("not a sha256 hash in hex, nix32, base64 or SRI notation")]
    Malformed,
}

impl FromStr for NixHash {
    type Err = HashParseError;

    /// Accepts `sha256:<hex|nix32|base64>` and SRI `sha256-<base64>`.
    fn from_str(s: &str) -> Result<NixHash, HashParseError> {
        let (algo, body, sri) = match (s.split_once(':'), s.split_once('-')) {
            (Some((a, b)), _) => (a, b, false),
            (None, Some((a, b))) => (a, b, true),
            (None, None) => return Err(HashParseError::Malformed),
        };
        if algo != "sha256" {
            return Err(HashParseError::Algorithm(algo.to_string()));
        }
        let bytes = match body.len() {
            64 if !sri => hex::decode(body).ok(),
            NIX32_LEN if !sri => nix32_decode(body),
            44 => base64::engine::general_purpose::STANDARD.decode(body).ok(),
            _ => None,
        };
        bytes
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .map(NixHash)
            .ok_or(HashParseError::Malformed)
    }
}

/// Encode bytes in nix32. Character `k` (from the right) holds bits
/// `5k..5k+5` of the bytes read as one little-endian number.
pub fn nix32_encode(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return String::new();
    }
    let len = (bytes.len() * 8 - 1) / 5 + 1;
    let mut out = String::with_capacity(len);
    for k in (0..len).rev() {
        let bit = k * 5;
        let (byte, shift) = (bit / 8, bit % 8);
        let low = u16::from(bytes[byte]) >> shift;
        let high = bytes
            .get(byte + 1)
            .map_or(0, |b| u16::from(*b) << (8 - shift));
        out.push(char::from(NIX32[usize::from((low | high) & 0x1f)]));
    }
    out
}

/// Decode nix32 into 32 bytes; `None` for a bad character or overflowing bits.
pub fn nix32_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = vec![0u8; text.len() * 5 / 8];
    for (k, c) in text.bytes().rev().enumerate() {
        let digit = NIX32.iter().position(|&a| a == c)? as u16;
        let bit = k * 5;
        let (byte, shift) = (bit / 8, bit % 8);
        let value = digit << shift;
        *out.get_mut(byte)? |= (value & 0xff) as u8;
        let carry = (value >> 8) as u8;
        match out.get_mut(byte + 1) {
            Some(next) => *next |= carry,
            None if carry != 0 => return None,
            None => {}
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    // A real pair from a store made with Debian's nix-bin: the database's
    // `hash` column and the nix32 form Nix printed for the same path.
    const HEX: &str = "c3ede68bf573447c44b7190d12b78b164453a587f5bb48130d59543e8f278a86";
    const N32: &str = "11la4y7kwm2r1l9lifzmhyjm6i0nifvi438rnx27qi3kyn5ydvf3";

    #[test]
    fn nix32_matches_what_nix_prints() {
        let bytes = hex::decode(HEX).unwrap();
        assert_eq!(nix32_encode(&bytes), N32);
        assert_eq!(nix32_decode(N32).unwrap(), bytes);
    }

    #[test]
    fn every_notation_parses_to_the_same_hash() {
        let bytes: [u8; 32] = hex::decode(HEX).unwrap().try_into().unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
        for text in [
            format!("sha256:{HEX}"),
            format!("sha256:{N32}"),
            format!("sha256:{b64}"),
            format!("sha256-{b64}"),
        ] {
            assert_eq!(text.parse::<NixHash>(), Ok(NixHash(bytes)), "{text}");
        }
        assert_eq!(NixHash(bytes).to_string(), format!("sha256:{N32}"));
    }

    #[test]
    fn bad_hashes_are_refused() {
        assert_eq!(
            "md5:abc".parse::<NixHash>(),
            Err(HashParseError::Algorithm("md5".into()))
        );
        for bad in [
            "sha256",
            "sha256:xyz",
            &format!("sha256:{}", &HEX[1..]),
            // 'e' is not in the nix32 alphabet
            &format!("sha256:e{}", &N32[1..]),
            // the top bits of the first character overflow 256 bits
            &format!("sha256:z{}", &N32[1..]),
        ] {
            assert_eq!(
                bad.parse::<NixHash>(),
                Err(HashParseError::Malformed),
                "{bad}"
            );
        }
    }
}
