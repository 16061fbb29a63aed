//! Where backups go, behind one interface: a filesystem path (a second
//! volume) or S3-compatible object storage, both through `object_store`.

use std::sync::Arc;

use bruno_core::Secret;
use bytes::Bytes;
use futures_util::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::Deserialize;

use crate::BackupError;

/// `[backup.s3]`: how to reach an S3-compatible target (`s3://bucket/prefix`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    /// Endpoint for MinIO and other S3-compatible servers (empty: AWS).
    pub endpoint: Option<String>,
    /// Region (MinIO ignores it).
    pub region: Option<String>,
    /// Access key id (else the AWS environment / instance role).
    pub access_key_id: Option<Secret>,
    /// Secret access key.
    pub secret_access_key: Option<Secret>,
    /// Allow `http://` endpoints (a MinIO inside the cluster).
    pub allow_http: bool,
}

/// A backup target: a store and the prefix every backup lives under.
#[derive(Clone, Debug)]
pub struct Target {
    store: Arc<dyn ObjectStore>,
    uri: String,
    /// The directory of a filesystem target (whose emptied directories
    /// would otherwise still list).
    local: Option<std::path::PathBuf>,
}

impl Target {
    /// Open `uri`: `s3://bucket[/prefix]`, `file:///path` or a plain path
    /// (created if missing).
    pub fn open(uri: &str, s3: &S3Config) -> Result<Self, BackupError> {
        let mut local = None;
        let store: Arc<dyn ObjectStore> = if uri.starts_with("s3://") {
            let mut b = AmazonS3Builder::from_env().with_url(uri);
            if let Some(e) = &s3.endpoint {
                b = b.with_endpoint(e);
            }
            b = b.with_region(s3.region.as_deref().unwrap_or("us-east-1"));
            if let Some(k) = &s3.access_key_id {
                b = b.with_access_key_id(k.expose());
            }
            if let Some(k) = &s3.secret_access_key {
                b = b.with_secret_access_key(k.expose());
            }
            let b = b.with_allow_http(s3.allow_http);
            let store = b
                .build()
                .map_err(|e| BackupError::Target(format!("{uri}: {e}")))?;
            // The URL's path is the prefix inside the bucket.
            let prefix = url::Url::parse(uri)
                .map(|u| u.path().trim_matches('/').to_owned())
                .unwrap_or_default();
            if prefix.is_empty() {
                Arc::new(store)
            } else {
                Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
            }
        } else {
            let path = uri.strip_prefix("file://").unwrap_or(uri);
            std::fs::create_dir_all(path)?;
            local = Some(std::path::PathBuf::from(path));
            Arc::new(
                LocalFileSystem::new_with_prefix(path)
                    .map_err(|e| BackupError::Target(format!("{uri}: {e}")))?,
            )
        };
        Ok(Self {
            store,
            uri: uri.to_owned(),
            local,
        })
    }

    /// The URI it was opened with.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Write a whole small object.
    pub async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), BackupError> {
        self.store
            .put(&Path::from(key), PutPayload::from(bytes))
            .await?;
        Ok(())
    }

    /// A writer for a large object, uploaded in parts as it is written.
    pub fn writer(&self, key: &str) -> object_store::buffered::BufWriter {
        object_store::buffered::BufWriter::new(self.store.clone(), Path::from(key))
    }

    /// Read a whole small object; `None` if it does not exist.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, BackupError> {
        match self.store.get(&Path::from(key)).await {
            Ok(r) => Ok(Some(r.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Stream an object's bytes.
    pub async fn stream(
        &self,
        key: &str,
    ) -> Result<futures_util::stream::BoxStream<'static, object_store::Result<Bytes>>, BackupError>
    {
        match self.store.get(&Path::from(key)).await {
            Ok(r) => Ok(r.into_stream()),
            Err(object_store::Error::NotFound { .. }) => {
                Err(BackupError::Corrupt(format!("object {key} is missing")))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The top-level names (backup ids) under the target.
    pub async fn ids(&self) -> Result<Vec<String>, BackupError> {
        let listed = self.store.list_with_delimiter(None).await?;
        let mut ids: Vec<String> = listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.parts().next_back().map(|s| s.as_ref().to_owned()))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Delete one object (absent is fine).
    pub async fn delete(&self, key: &str) -> Result<(), BackupError> {
        match self.store.delete(&Path::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Delete every object under `prefix`.
    pub async fn delete_all(&self, prefix: &str) -> Result<u64, BackupError> {
        let prefix = Path::from(prefix);
        let mut listed = self.store.list(Some(&prefix));
        let mut n = 0;
        while let Some(meta) = listed.next().await {
            let meta = meta?;
            match self.store.delete(&meta.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => n += 1,
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(root) = &self.local {
            let dir = root.join(prefix.as_ref());
            if dir.is_dir() {
                std::fs::remove_dir_all(dir)?;
            }
        }
        Ok(n)
    }
}
