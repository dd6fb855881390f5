//! The OpenAPI 3.1 document of the HTTP routes, served at `/api/v1/openapi.json`.

use serde_json::{Value, json};

fn json_response(description: &str, schema: Value) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": schema } } })
}

fn status_schema() -> Value {
    json!({
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": { "type": "string" },
            "reason": { "type": "string" }
        }
    })
}

pub fn document() -> Value {
    let key = json!({ "type": "string", "description": "base58-encoded 32-byte key" });
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "nym-node HTTP API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Health, metrics and the signed public description of a mixnet node."
        },
        "paths": {
            "/livez": { "get": {
                "summary": "Liveness: the accept loop and the forwarder are running",
                "operationId": "livez",
                "responses": {
                    "200": json_response("alive", status_schema()),
                    "503": json_response("a core task stopped or stalled", status_schema())
                }
            }},
            "/readyz": { "get": {
                "summary": "Readiness: keys, topology and listeners in place, not draining",
                "operationId": "readyz",
                "responses": {
                    "200": json_response("ready for traffic", status_schema()),
                    "503": json_response("not ready; `reason` says why", status_schema())
                }
            }},
            "/metrics": { "get": {
                "summary": "Prometheus text exposition",
                "operationId": "metrics",
                "security": [ {}, { "bearer": [] } ],
                "responses": {
                    "200": { "description": "metrics", "content": { "text/plain": { "schema": { "type": "string" } } } },
                    "401": { "description": "a token is configured and the request lacks it" }
                }
            }},
            "/api/v1/description": { "get": {
                "summary": "The node's public description, signed with its identity key",
                "operationId": "description",
                "responses": { "200": json_response("signed description", json!({
                    "type": "object",
                    "required": ["description", "signature"],
                    "properties": {
                        "description": {
                            "type": "object",
                            "required": ["name", "mode", "identity_key", "sphinx_keys", "noise_key", "mixnet_address", "http_address", "version", "topology_revision"],
                            "properties": {
                                "name": { "type": "string" },
                                "mode": { "type": "string", "enum": ["mixnode", "entry-gateway", "exit-gateway"] },
                                "layer": { "type": "integer", "minimum": 1, "maximum": 3 },
                                "identity_key": key,
                                "sphinx_keys": {
                                    "type": "array",
                                    "description": "Sphinx keys of the current and the next epoch",
                                    "items": {
                                        "type": "object",
                                        "required": ["epoch", "valid_from_ms", "valid_until_ms", "key"],
                                        "properties": {
                                            "epoch": { "type": "integer", "minimum": 0 },
                                            "valid_from_ms": { "type": "integer", "minimum": 0 },
                                            "valid_until_ms": { "type": "integer", "minimum": 0 },
                                            "key": key
                                        }
                                    }
                                },
                                "noise_key": key,
                                "mixnet_address": { "type": "string" },
                                "client_address": { "type": "string" },
                                "http_address": { "type": "string" },
                                "version": { "type": "string" },
                                "topology_revision": { "type": "integer", "minimum": 0 }
                            }
                        },
                        "signature": { "type": "string", "description": "base58 ed25519 signature over the compact JSON of `description`" }
                    }
                }))}
            }},
            "/api/v1/build-information": { "get": {
                "summary": "Build facts",
                "operationId": "buildInformation",
                "responses": { "200": json_response("build information", json!({
                    "type": "object",
                    "required": ["binary_name", "version", "commit", "rustc", "profile"],
                    "properties": {
                        "binary_name": { "type": "string" },
                        "version": { "type": "string" },
                        "commit": { "type": "string" },
                        "rustc": { "type": "string" },
                        "profile": { "type": "string" }
                    }
                }))}
            }},
            "/api/v1/openapi.json": { "get": {
                "summary": "This document",
                "operationId": "openapi",
                "responses": { "200": { "description": "OpenAPI document", "content": { "application/json": { "schema": { "type": "object" } } } } }
            }}
        },
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } }
        }
    })
}
