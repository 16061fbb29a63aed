//! A backup's manifest, written last (a backup without one is visibly
//! incomplete) and authenticated with a key derived from the backup key.

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::BackupError;
use crate::crypt::Key;

/// The manifest's object name inside a backup.
pub const MANIFEST: &str = "manifest.json";
/// Written once a restore of the backup was verified.
pub const VERIFIED: &str = "verified.json";

/// One stored object (one file of a table version, encrypted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Object {
    /// Path inside the table directory (`data/….lance`, `_versions/….manifest`).
    pub path: String,
    /// Plaintext bytes.
    pub size: u64,
    /// SHA-256 of the plaintext.
    pub sha256: String,
    /// Stored (encrypted) bytes.
    pub stored_size: u64,
    /// SHA-256 of the stored bytes.
    pub stored_sha256: String,
}

/// One table in a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableEntry {
    /// Table name.
    pub name: String,
    /// The table version captured.
    pub version: u64,
    /// Rows at that version.
    pub rows: u64,
    /// Its files.
    pub objects: Vec<Object>,
}

impl TableEntry {
    /// Plaintext bytes of the table's files.
    pub fn bytes(&self) -> u64 {
        self.objects.iter().map(|o| o.size).sum()
    }
    /// Stored bytes.
    pub fn stored_bytes(&self) -> u64 {
        self.objects.iter().map(|o| o.stored_size).sum()
    }
}

/// What a backup holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version of this manifest.
    pub format: u32,
    /// Backup id (sortable by time).
    pub backup_id: String,
    /// When the table versions were pinned.
    pub pinned_at: DateTime<Utc>,
    /// When the manifest was written.
    pub finished_at: DateTime<Utc>,
    /// `bruno` version that wrote it.
    pub tool_version: String,
    /// Fingerprint of the key the objects are encrypted with.
    pub key_fingerprint: String,
    /// The tables.
    pub tables: Vec<TableEntry>,
    /// HMAC-SHA256 (hex) of the manifest with this field empty.
    #[serde(default)]
    pub mac: String,
}

/// The verification record of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verified {
    /// When the restore check passed.
    pub verified_at: DateTime<Utc>,
    /// SHA-256 of the manifest it checked.
    pub manifest_sha256: String,
}

fn mac_of(key: &Key, m: &Manifest) -> Result<String, BackupError> {
    let mut unsigned = m.clone();
    unsigned.mac = String::new();
    let bytes = serde_json::to_vec(&unsigned)?;
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(&key.mac_key()).map_err(|_| BackupError::Crypto)?;
    mac.update(&bytes);
    Ok(hex::encode(mac.finalize().into_bytes()))
}

impl Manifest {
    /// Sign with `key` and serialise.
    pub fn seal(mut self, key: &Key) -> Result<Vec<u8>, BackupError> {
        self.mac = mac_of(key, &self)?;
        Ok(serde_json::to_vec_pretty(&self)?)
    }

    /// Parse and authenticate; a wrong key and a changed manifest are told apart.
    pub fn open(bytes: &[u8], key: &Key) -> Result<Self, BackupError> {
        let m: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| BackupError::Corrupt(format!("manifest: {e}")))?;
        if m.key_fingerprint != key.fingerprint() {
            return Err(BackupError::WrongKey {
                backup: m.key_fingerprint,
                configured: key.fingerprint(),
            });
        }
        let expected = mac_of(key, &m)?;
        let ok = hex::decode(&m.mac)
            .ok()
            .zip(hex::decode(&expected).ok())
            .is_some_and(|(a, b)| {
                // Constant time is moot for a local check, but cheap.
                a.len() == b.len() && a.iter().zip(&b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
            });
        if !ok {
            return Err(BackupError::Corrupt(
                "manifest does not authenticate (changed after it was written)".into(),
            ));
        }
        Ok(m)
    }

    /// SHA-256 of the manifest as stored (for an opened manifest).
    pub fn sha256(&self) -> Result<String, BackupError> {
        use sha2::Digest;
        Ok(hex::encode(Sha256::digest(serde_json::to_vec_pretty(
            self,
        )?)))
    }

    /// Total rows.
    pub fn rows(&self) -> u64 {
        self.tables.iter().map(|t| t.rows).sum()
    }

    /// Total plaintext bytes.
    pub fn bytes(&self) -> u64 {
        self.tables.iter().map(TableEntry::bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(key: &Key) -> Manifest {
        Manifest {
            format: 1,
            backup_id: "b1".into(),
            pinned_at: Utc::now(),
            finished_at: Utc::now(),
            tool_version: "0".into(),
            key_fingerprint: key.fingerprint(),
            tables: vec![TableEntry {
                name: "chunks".into(),
                version: 3,
                rows: 10,
                objects: vec![],
            }],
            mac: String::new(),
        }
    }

    #[test]
    fn a_changed_manifest_or_another_key_is_refused() {
        let key = Key::generate();
        let sealed = sample(&key).seal(&key).unwrap();
        assert_eq!(Manifest::open(&sealed, &key).unwrap().rows(), 10);
        let changed = String::from_utf8(sealed.clone())
            .unwrap()
            .replace("\"rows\": 10", "\"rows\": 11");
        assert!(matches!(
            Manifest::open(changed.as_bytes(), &key),
            Err(BackupError::Corrupt(_))
        ));
        assert!(matches!(
            Manifest::open(&sealed, &Key::generate()),
            Err(BackupError::WrongKey { .. })
        ));
    }
}
