use schemars::JsonSchema;
use serde::{Serialize, de::DeserializeOwned};

use crate::legacy::MemoryWriteV1;
use crate::{Event, ValidationError, decode_data, payload::*};

/// A catalogue payload: its struct is the event's `data`.
pub trait EventData: Serialize + DeserializeOwned + JsonSchema + Send + Sync + 'static {
    /// The versioned CloudEvent type, `bruno.<name>.v<n>`.
    const TYPE: &'static str;

    /// Checks beyond the schema (non-empty ids and the like).
    fn check(&self) -> Result<(), ValidationError> {
        Ok(())
    }
}

/// One event type of the catalogue.
#[derive(Clone, Copy)]
pub struct CatalogueEntry {
    /// The versioned CloudEvent type.
    pub ty: &'static str,
    /// What the event means.
    pub summary: &'static str,
    /// Who emits it. (Who consumes it is the part registry's to say: each
    /// part's handler declares the types it takes.)
    pub producers: &'static [&'static str],
    /// JSON Schema of `data`.
    pub schema: fn() -> schemars::Schema,
    /// Decode and check `data` of an event of this type.
    pub check: fn(&Event) -> Result<(), ValidationError>,
}

impl std::fmt::Debug for CatalogueEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatalogueEntry")
            .field("ty", &self.ty)
            .finish_non_exhaustive()
    }
}

fn check<T: EventData>(event: &Event) -> Result<(), ValidationError> {
    decode_data::<T>(event)?.check()
}

fn non_empty(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.trim().is_empty() {
        Err(ValidationError::new(field, "must not be empty"))
    } else {
        Ok(())
    }
}

macro_rules! catalogue {
    ($( $ty:ident => $name:literal, $summary:literal, [$($p:literal),*]; )*) => {
        $(
            impl EventData for $ty {
                const TYPE: &'static str = $name;
                fn check(&self) -> Result<(), ValidationError> {
                    extra_checks::$ty(self)
                }
            }
        )*

        static CATALOGUE: &[CatalogueEntry] = &[
            $(CatalogueEntry {
                ty: $name,
                summary: $summary,
                producers: &[$($p),*],
                schema: || schemars::schema_for!($ty),
                check: check::<$ty>,
            },)*
        ];
    };
}

catalogue! {
    DocumentSubmitted => "bruno.document.submitted.v1", "a document to add to or replace in the knowledge base", ["producer", "bruno ingest"];
    DocumentChunked => "bruno.document.chunked.v1", "one batch of a long document's chunks, to embed on any embedder replica", ["embedder"];
    MemoryWrite => "bruno.memory.write.v2", "typed rows with vectors for the single LanceDB writer", ["embedder"];
    MemoryWriteV1 => "bruno.memory.write.v1", "retired: untyped rows for the writer (still read, no longer produced)", ["embedder before v2"];
    DocumentIndexed => "bruno.document.indexed.v1", "the writer committed a document's chunks (or the embedder found them unchanged)", ["writer", "embedder"];
    SearchRequested => "bruno.search.requested.v1", "a knowledge-base search awaiting a correlated reply", ["gateway"];
    SearchCompleted => "bruno.search.completed.v1", "the hits of a search", ["retriever"];
    ChatRequested => "bruno.chat.requested.v1", "one user turn of a conversation", ["gateway"];
    ChatContextualized => "bruno.chat.contextualized.v1", "a chat turn with retrieved passages and memory", ["retriever"];
    ChatDelta => "bruno.chat.delta.v1", "a streamed piece of an answer", ["generator"];
    ChatCompleted => "bruno.chat.completed.v1", "the final answer of a turn", ["generator"];
    ChatFailed => "bruno.chat.failed.v1", "a turn that could not be answered", ["retriever", "generator"];
    BackupRequested => "bruno.backup.requested.v1", "take a backup of the LanceDB tables", ["PingSource", "cron", "bruno backup"];
    BackupCompleted => "bruno.backup.completed.v1", "a verified backup exists", ["backup"];
    BackupFailed => "bruno.backup.failed.v1", "a backup could not be taken", ["backup"];
}

/// Payload checks beyond the JSON Schema, one function per payload.
#[allow(non_snake_case)]
mod extra_checks {
    use super::*;

    pub fn DocumentSubmitted(d: &DocumentSubmitted) -> Result<(), ValidationError> {
        non_empty("data.doc_id", &d.doc_id)?;
        non_empty("data.source", &d.source)?;
        non_empty("data.text", &d.text)
    }
    pub fn DocumentChunked(d: &DocumentChunked) -> Result<(), ValidationError> {
        non_empty("data.doc_id", &d.doc_id)?;
        non_empty("data.source", &d.source)?;
        non_empty("data.content_hash", &d.content_hash)?;
        if d.texts.is_empty() {
            return Err(ValidationError::new("data.texts", "must not be empty"));
        }
        let end = u64::from(d.first_chunk) + d.texts.len() as u64;
        if end > u64::from(d.chunk_count) {
            return Err(ValidationError::new(
                "data.first_chunk",
                format!(
                    "chunks {}..{end} lie beyond chunk_count {}",
                    d.first_chunk, d.chunk_count
                ),
            ));
        }
        Ok(())
    }
    fn vector(field: String, v: &[f32], e: &EmbedderInfo) -> Result<(), ValidationError> {
        if v.len() != e.dimension as usize {
            return Err(ValidationError::new(
                field,
                format!("has {} dimensions, embedder says {}", v.len(), e.dimension),
            ));
        }
        if v.iter().any(|x| !x.is_finite()) {
            return Err(ValidationError::new(field, "holds a non-finite number"));
        }
        Ok(())
    }
    pub fn MemoryWrite(d: &MemoryWrite) -> Result<(), ValidationError> {
        match d {
            MemoryWrite::Chunks(w) => {
                non_empty("data.doc_id", &w.doc_id)?;
                non_empty("data.source", &w.source)?;
                non_empty("data.content_hash", &w.content_hash)?;
                for (i, row) in w.rows.iter().enumerate() {
                    non_empty(&format!("data.rows[{i}].id"), &row.id)?;
                    if !w.chunk_ids.contains(&row.id) {
                        return Err(ValidationError::new(
                            format!("data.rows[{i}].id"),
                            format!("row {} is not in chunk_ids", row.id),
                        ));
                    }
                    vector(format!("data.rows[{i}].vector"), &row.vector, &w.embedder)?;
                }
            }
            MemoryWrite::Conversations(w) => {
                for (i, row) in w.rows.iter().enumerate() {
                    non_empty(&format!("data.rows[{i}].id"), &row.id)?;
                    non_empty(&format!("data.rows[{i}].session_id"), &row.session_id)?;
                    vector(format!("data.rows[{i}].vector"), &row.vector, &w.embedder)?;
                }
            }
        }
        Ok(())
    }
    pub fn MemoryWriteV1(d: &MemoryWriteV1) -> Result<(), ValidationError> {
        super::MemoryWrite::try_from(d.clone())?.check()
    }
    pub fn DocumentIndexed(_: &DocumentIndexed) -> Result<(), ValidationError> {
        Ok(())
    }
    pub fn SearchRequested(d: &SearchRequested) -> Result<(), ValidationError> {
        non_empty("data.query", &d.query)?;
        if d.k == 0 || d.k > 100 {
            return Err(ValidationError::new("data.k", "must be between 1 and 100"));
        }
        Ok(())
    }
    pub fn SearchCompleted(_: &SearchCompleted) -> Result<(), ValidationError> {
        Ok(())
    }
    pub fn ChatRequested(d: &ChatRequested) -> Result<(), ValidationError> {
        non_empty("data.session_id", &d.session_id)?;
        non_empty("data.message", &d.message)
    }
    pub fn ChatContextualized(d: &ChatContextualized) -> Result<(), ValidationError> {
        ChatRequested(&d.request)
    }
    pub fn ChatDelta(_: &ChatDelta) -> Result<(), ValidationError> {
        Ok(())
    }
    pub fn ChatCompleted(_: &ChatCompleted) -> Result<(), ValidationError> {
        Ok(())
    }
    pub fn ChatFailed(_: &ChatFailed) -> Result<(), ValidationError> {
        Ok(())
    }
    pub fn BackupRequested(_: &BackupRequested) -> Result<(), ValidationError> {
        Ok(())
    }
    pub fn BackupCompleted(_: &BackupCompleted) -> Result<(), ValidationError> {
        Ok(())
    }
    pub fn BackupFailed(_: &BackupFailed) -> Result<(), ValidationError> {
        Ok(())
    }
}

/// Every event type Bruno knows.
pub fn catalogue() -> &'static [CatalogueEntry] {
    CATALOGUE
}

/// The catalogue entry of a type, if it is known.
pub fn entry(ty: &str) -> Option<&'static CatalogueEntry> {
    CATALOGUE.iter().find(|e| e.ty == ty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_is_versioned_and_unique() {
        let mut seen = std::collections::HashSet::new();
        for e in catalogue() {
            assert!(e.ty.starts_with("bruno."), "{}", e.ty);
            let version = e.ty.rsplit('.').next().unwrap_or_default();
            assert!(
                version.starts_with('v') && version[1..].parse::<u32>().is_ok(),
                "{}",
                e.ty
            );
            assert!(seen.insert(e.ty), "duplicate {}", e.ty);
        }
        assert_eq!(catalogue().len(), 15);
    }

    #[test]
    fn a_chunk_batch_must_lie_within_its_document() {
        let batch = |first: u32, texts: usize, count: u32| DocumentChunked {
            doc_id: "d".into(),
            source: "s".into(),
            title: None,
            content_hash: "h".into(),
            chunk_count: count,
            first_chunk: first,
            texts: vec!["t".into(); texts],
        };
        let check = |b: &DocumentChunked| {
            let event = crate::new_event("tests", b);
            (entry(DocumentChunked::TYPE).unwrap().check)(&event)
        };
        assert!(check(&batch(32, 32, 64)).is_ok());
        let err = check(&batch(40, 32, 64)).unwrap_err();
        assert_eq!(err.field, "data.first_chunk", "{err}");
        assert!(err.message.contains("40..72"), "{err}");
        assert_eq!(
            check(&batch(u32::MAX, 2, 3)).unwrap_err().field,
            "data.first_chunk"
        );
        assert_eq!(check(&batch(0, 0, 3)).unwrap_err().field, "data.texts");
    }

    #[test]
    fn schemas_name_required_fields() {
        let schema =
            serde_json::to_value((entry(DocumentSubmitted::TYPE).unwrap().schema)()).unwrap();
        let required = schema["required"].as_array().unwrap();
        for field in ["doc_id", "source", "text"] {
            assert!(
                required.iter().any(|r| r == field),
                "{field} not required: {schema}"
            );
        }
    }
}
