//! The parts of the Bruno fleet and the events each subscribes to (its
//! "trigger"). One place, so `bruno dev`, the topology declaration, the DLQ
//! tools and the deploy manifests agree.

use bruno_broker::PartSpec;
use bruno_events::EventData;
use bruno_events::payload::*;

/// Every consumer part with its bindings.
pub fn parts() -> Vec<PartSpec> {
    vec![
        PartSpec::on_types("embedder", &[DocumentSubmitted::TYPE, ChatCompleted::TYPE]),
        PartSpec::on_types("retriever", &[SearchRequested::TYPE, ChatRequested::TYPE]),
        PartSpec::on_types("generator", &[ChatContextualized::TYPE]),
        PartSpec::on_types("writer", &[MemoryWrite::TYPE]).single_active(),
        PartSpec::on_types("backup", &[BackupRequested::TYPE]),
    ]
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_binding_is_a_catalogue_type() {
        for part in super::parts() {
            for binding in &part.bindings {
                let ty = &binding["type"];
                assert!(
                    bruno_events::entry(ty).is_some(),
                    "{} binds unknown {ty}",
                    part.name
                );
            }
        }
    }
}
