//! Authenticated encryption of backup objects: XChaCha20-Poly1305 in the
//! STREAM construction (RustCrypto `aead::stream`, big-endian 32-bit
//! counter), 64 KiB segments, so an object of any size is encrypted and
//! decrypted with one segment in memory. Each segment is bound to the
//! object's name (associated data), so objects cannot be swapped; the last
//! segment is marked, so a truncated object is refused.
//!
//! Object layout: `BRUNOBK1` (8 bytes) ‖ a random 19-byte nonce prefix ‖
//! segments of `SEGMENT + 16` bytes (the last one shorter, possibly only its
//! 16-byte tag).

use std::path::Path;

use chacha20poly1305::XChaCha20Poly1305;
use chacha20poly1305::aead::stream::{DecryptorBE32, EncryptorBE32};
use chacha20poly1305::aead::{KeyInit, OsRng, rand_core::RngCore};
use sha2::{Digest, Sha256};

use crate::BackupError;

/// Plaintext bytes per segment.
pub const SEGMENT: usize = 64 * 1024;
const MAGIC: &[u8; 8] = b"BRUNOBK1";
const NONCE: usize = 19;
const TAG: usize = 16;

/// The backup key: 32 random bytes, never printed.
#[derive(Clone)]
pub struct Key([u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({})", self.fingerprint())
    }
}

impl Key {
    /// A new random key.
    pub fn generate() -> Self {
        let mut k = [0u8; 32];
        OsRng.fill_bytes(&mut k);
        Self(k)
    }

    /// Parse a key written as 64 hex digits (surrounding white space ignored).
    pub fn parse(text: &str) -> Result<Self, BackupError> {
        let bytes = hex::decode(text.trim())
            .map_err(|e| BackupError::Key(format!("not 64 hex digits: {e}")))?;
        let k: [u8; 32] = bytes
            .try_into()
            .map_err(|_| BackupError::Key("a key is 32 bytes (64 hex digits)".into()))?;
        Ok(Self(k))
    }

    /// Read the key file, or create it (mode 0600) with a new key when
    /// `create` and it does not exist.
    pub fn load(path: &Path, create: bool) -> Result<Self, BackupError> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                Self::parse(&text).map_err(|e| BackupError::Key(format!("{}: {e}", path.display())))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                let key = Self::generate();
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                write_private(path, &hex::encode(key.0))?;
                tracing::warn!(
                    path = %path.display(),
                    fingerprint = %key.fingerprint(),
                    "generated a new backup key; keep a copy of it away from the backups"
                );
                Ok(key)
            }
            Err(e) => Err(BackupError::Key(format!("{}: {e}", path.display()))),
        }
    }

    /// A public name of the key: the first 16 hex digits of a hash of it.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"bruno-backup-key-fingerprint\0");
        h.update(self.0);
        hex::encode(&h.finalize()[..8])
    }

    /// The key that authenticates manifests, derived from this one.
    pub fn mac_key(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"bruno-backup-manifest-mac\0");
        h.update(self.0);
        h.finalize().into()
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&self.0).into())
    }
}

#[cfg(unix)]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)
}

/// Encrypts one object segment by segment.
pub struct Sealer {
    stream: Option<EncryptorBE32<XChaCha20Poly1305>>,
    aad: Vec<u8>,
    buf: Vec<u8>,
}

impl Sealer {
    /// Start an object named `name`; returns the sealer and the header bytes.
    pub fn new(key: &Key, name: &str) -> (Self, Vec<u8>) {
        let mut nonce = [0u8; NONCE];
        OsRng.fill_bytes(&mut nonce);
        let stream = EncryptorBE32::from_aead(key.cipher(), (&nonce).into());
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&nonce);
        (
            Self {
                stream: Some(stream),
                aad: name.as_bytes().to_vec(),
                buf: Vec::with_capacity(SEGMENT),
            },
            header,
        )
    }

    /// Add plaintext; returns the ciphertext of every segment it completed.
    pub fn update(&mut self, mut data: &[u8]) -> Result<Vec<u8>, BackupError> {
        let mut out = Vec::new();
        while !data.is_empty() {
            let take = (SEGMENT - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            // A full segment is sealed only once more data follows, so the
            // last segment is always sealed by `finish` with the last flag.
            if self.buf.len() == SEGMENT && !data.is_empty() {
                out.extend(self.seal_full()?);
            }
        }
        Ok(out)
    }

    fn seal_full(&mut self) -> Result<Vec<u8>, BackupError> {
        let stream = self.stream.as_mut().ok_or(BackupError::Crypto)?;
        let sealed = stream
            .encrypt_next(chacha20poly1305::aead::Payload {
                msg: &self.buf,
                aad: &self.aad,
            })
            .map_err(|_| BackupError::Crypto)?;
        self.buf.clear();
        Ok(sealed)
    }

    /// Seal what is left as the last segment.
    pub fn finish(mut self) -> Result<Vec<u8>, BackupError> {
        let stream = self.stream.take().ok_or(BackupError::Crypto)?;
        stream
            .encrypt_last(chacha20poly1305::aead::Payload {
                msg: &self.buf,
                aad: &self.aad,
            })
            .map_err(|_| BackupError::Crypto)
    }
}

/// Decrypts one object segment by segment; any change, truncation,
/// reordering, another name or another key is an error.
pub struct Opener {
    stream: Option<DecryptorBE32<XChaCha20Poly1305>>,
    aad: Vec<u8>,
    buf: Vec<u8>,
    header: Vec<u8>,
    key: Key,
}

impl Opener {
    /// Start opening the object named `name`.
    pub fn new(key: &Key, name: &str) -> Self {
        Self {
            stream: None,
            aad: name.as_bytes().to_vec(),
            buf: Vec::new(),
            header: Vec::new(),
            key: key.clone(),
        }
    }

    /// Add ciphertext; returns the plaintext of every segment it completed.
    pub fn update(&mut self, mut data: &[u8]) -> Result<Vec<u8>, BackupError> {
        if self.stream.is_none() {
            let need = MAGIC.len() + NONCE - self.header.len();
            let take = need.min(data.len());
            self.header.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.header.len() < MAGIC.len() + NONCE {
                return Ok(Vec::new());
            }
            if &self.header[..MAGIC.len()] != MAGIC {
                return Err(BackupError::Corrupt("not a Bruno backup object".into()));
            }
            let nonce: [u8; NONCE] = self.header[MAGIC.len()..]
                .try_into()
                .map_err(|_| BackupError::Crypto)?;
            self.stream = Some(DecryptorBE32::from_aead(self.key.cipher(), (&nonce).into()));
        }
        let mut out = Vec::new();
        self.buf.extend_from_slice(data);
        // Keep one whole segment back: only `finish` knows which is last.
        while self.buf.len() > SEGMENT + TAG {
            let rest = self.buf.split_off(SEGMENT + TAG);
            let segment = std::mem::replace(&mut self.buf, rest);
            let stream = self.stream.as_mut().ok_or(BackupError::Crypto)?;
            let plain = stream
                .decrypt_next(chacha20poly1305::aead::Payload {
                    msg: &segment,
                    aad: &self.aad,
                })
                .map_err(|_| BackupError::Authentication)?;
            out.extend(plain);
        }
        Ok(out)
    }

    /// Open the last segment.
    pub fn finish(mut self) -> Result<Vec<u8>, BackupError> {
        let stream = self
            .stream
            .take()
            .ok_or_else(|| BackupError::Corrupt("object shorter than its header".into()))?;
        stream
            .decrypt_last(chacha20poly1305::aead::Payload {
                msg: &self.buf,
                aad: &self.aad,
            })
            .map_err(|_| BackupError::Authentication)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal(key: &Key, name: &str, plain: &[u8], piece: usize) -> Vec<u8> {
        let (mut s, mut out) = Sealer::new(key, name);
        for chunk in plain.chunks(piece.max(1)) {
            out.extend(s.update(chunk).unwrap());
        }
        out.extend(s.finish().unwrap());
        out
    }

    fn open(key: &Key, name: &str, sealed: &[u8], piece: usize) -> Result<Vec<u8>, BackupError> {
        let mut o = Opener::new(key, name);
        let mut out = Vec::new();
        for chunk in sealed.chunks(piece.max(1)) {
            out.extend(o.update(chunk)?);
        }
        out.extend(o.finish()?);
        Ok(out)
    }

    #[test]
    fn round_trips_at_every_size_around_segment_boundaries() {
        let key = Key::generate();
        for len in [
            0,
            1,
            SEGMENT - 1,
            SEGMENT,
            SEGMENT + 1,
            3 * SEGMENT,
            3 * SEGMENT + 7,
        ] {
            let plain: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            for piece in [1000, SEGMENT, 200_000] {
                let sealed = seal(&key, "t/data/a.lance", &plain, piece);
                assert_eq!(open(&key, "t/data/a.lance", &sealed, 777).unwrap(), plain);
            }
        }
    }

    #[test]
    fn flipped_truncated_renamed_or_wrongly_keyed_objects_are_refused() {
        let key = Key::generate();
        let plain = vec![7u8; 2 * SEGMENT + 100];
        let sealed = seal(&key, "a", &plain, SEGMENT);
        let mut flipped = sealed.clone();
        flipped[40_000] ^= 1;
        assert!(open(&key, "a", &flipped, 4096).is_err());
        for cut in [sealed.len() - 1, SEGMENT + TAG + 27, 27, 5] {
            assert!(
                open(&key, "a", &sealed[..cut], 4096).is_err(),
                "cut at {cut}"
            );
        }
        // Dropping the whole last segment leaves a "valid" prefix that is not marked last.
        assert!(open(&key, "a", &sealed[..27 + 2 * (SEGMENT + TAG)], 4096).is_err());
        assert!(open(&key, "b", &sealed, 4096).is_err());
        assert!(open(&Key::generate(), "a", &sealed, 4096).is_err());
    }

    #[test]
    fn keys_parse_and_never_print() {
        let key = Key::generate();
        let text = hex::encode(key.0);
        let again = Key::parse(&format!("  {text}\n")).unwrap();
        assert_eq!(again.fingerprint(), key.fingerprint());
        assert!(!format!("{key:?}").contains(&text));
        assert!(Key::parse("abcd").is_err());
        assert!(Key::parse(&"zz".repeat(32)).is_err());
    }
}
