//! API keys, hashed at rest: config holds SHA-256 hex digests; a request
//! presents the key as `Authorization: Bearer <key>` or `X-Api-Key: <key>`.

use http::{HeaderMap, header};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// API key settings that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A configured digest that is not 64 hex characters.
    #[error("invalid {setting}[{index}]: expected 64 hex characters (SHA-256)")]
    BadHash {
        /// The config key (`gateway.api_key_hashes`).
        setting: String,
        /// Which entry.
        index: usize,
    },
    /// Keys are required and none is configured: refuse to serve rather
    /// than serve everyone (no fail-open).
    #[error("{setting} is empty but API keys are required: refusing to start without them")]
    Missing {
        /// The config key (`gateway.api_key_hashes`).
        setting: String,
    },
}

/// The SHA-256 hex digest to configure for `key`.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.trim().as_bytes()))
}

/// The accepted keys; empty means no authentication.
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

/// The outcome of checking a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Keys are not configured: everyone is anonymous.
    Anonymous,
    /// A configured key, by its digest (hex): the identity for rate limits.
    Key(String),
}

impl ApiKeys {
    /// Parse configured digests; `setting` names the key in errors. With
    /// `required`, an empty list is an error instead of "no authentication".
    pub fn from_hashes(setting: &str, hashes: &[String], required: bool) -> Result<Self, KeyError> {
        if required && hashes.iter().all(|h| h.trim().is_empty()) {
            return Err(KeyError::Missing {
                setting: setting.to_owned(),
            });
        }
        let digests = hashes
            .iter()
            .enumerate()
            .map(|(index, h)| {
                hex::decode(h.trim())
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .ok_or_else(|| KeyError::BadHash {
                        setting: setting.to_owned(),
                        index,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { digests })
    }

    /// Who is calling, or `None` when a key is required and missing or wrong.
    pub fn check(&self, headers: &HeaderMap) -> Option<Caller> {
        if self.digests.is_empty() {
            return Some(Caller::Anonymous);
        }
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))?;
        let digest: [u8; 32] = Sha256::digest(presented.trim().as_bytes()).into();
        // Compare against every key so timing does not tell which one matched.
        let matched: bool = self
            .digests
            .iter()
            .fold(subtle::Choice::from(0), |acc, k| acc | k.ct_eq(&digest))
            .into();
        matched.then(|| Caller::Key(hex::encode(digest)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked_by_digest() {
        let keys = ApiKeys::from_hashes("k", &[hash_key("s3cret")], true).unwrap();
        let mut h = HeaderMap::new();
        assert_eq!(keys.check(&h), None);
        h.insert("x-api-key", "wrong".parse().unwrap());
        assert_eq!(keys.check(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer s3cret".parse().unwrap());
        assert_eq!(keys.check(&h), Some(Caller::Key(hash_key("s3cret"))));
        assert!(ApiKeys::from_hashes("k", &["xyz".into()], false).is_err());
        // Required and missing: an error naming the setting, never "open".
        let err = ApiKeys::from_hashes("gateway.api_key_hashes", &[], true).unwrap_err();
        assert!(matches!(err, KeyError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("gateway.api_key_hashes"));
        assert!(ApiKeys::from_hashes("k", &[], false).is_ok());
        assert_eq!(
            ApiKeys::default().check(&HeaderMap::new()),
            Some(Caller::Anonymous)
        );
    }
}
