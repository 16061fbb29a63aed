//! The catalogue as an AsyncAPI 3.0 document (committed as `docs/asyncapi.json`).

use serde_json::{Map, Value, json};

use crate::catalogue;

/// Render the whole catalogue as an AsyncAPI 3.0 document; `consumers`
/// names the parts that take an event type (the part registry knows).
pub fn document(consumers: impl Fn(&str) -> Vec<String>) -> Value {
    let mut channels = Map::new();
    let mut messages = Map::new();
    let mut operations = Map::new();
    for entry in catalogue() {
        let key = entry.ty.replace('.', "_");
        let schema = serde_json::to_value((entry.schema)()).unwrap_or(Value::Null);
        messages.insert(
            key.clone(),
            json!({
                "name": entry.ty,
                "summary": entry.summary,
                "contentType": crate::JSON,
                "headers": headers_schema(),
                "payload": schema,
                "x-producers": entry.producers,
                "x-consumers": consumers(entry.ty),
            }),
        );
        channels.insert(
            key.clone(),
            json!({
                "address": "bruno.events",
                "description": format!("headers exchange, bound on type={}", entry.ty),
                "messages": { key.clone(): { "$ref": format!("#/components/messages/{key}") } },
                "bindings": { "amqp": {
                    "is": "routingKey",
                    "exchange": { "name": "bruno.events", "type": "headers", "durable": true, "autoDelete": false },
                    "bindingVersion": "0.3.0"
                }}
            }),
        );
        operations.insert(
            format!("publish_{key}"),
            json!({
                "action": "send",
                "channel": { "$ref": format!("#/channels/{key}") },
                "summary": entry.summary,
            }),
        );
    }
    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "Bruno events",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "CloudEvents 1.0 on RabbitMQ, in the layout of Knative's RabbitMQ broker: attributes and extensions are un-prefixed AMQP headers, data is the body, content_type is datacontenttype, message_id is the event id, delivery mode persistent.",
        },
        "defaultContentType": crate::JSON,
        "channels": channels,
        "operations": operations,
        "components": { "messages": messages },
    })
}

fn headers_schema() -> Value {
    json!({
        "type": "object",
        "required": ["specversion", "id", "source", "type"],
        "properties": {
            "specversion": { "const": crate::SPEC_VERSION },
            "id": { "type": "string", "minLength": 1 },
            "source": { "type": "string", "minLength": 1 },
            "type": { "type": "string" },
            "time": { "type": "string", "format": "date-time" },
            "subject": { "type": "string" },
            "correlationid": { "type": "string" },
            "replyto": { "type": "string" },
            "traceparent": { "type": "string" },
            "tracestate": { "type": "string" }
        }
    })
}
