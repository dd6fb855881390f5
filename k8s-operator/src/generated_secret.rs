//! Secrets the operator makes for itself: created through the API the first time they are
//! needed, read back ever after, never rendered by a chart (so `helm template` gives the
//! same bytes every time, and GitOps tools never see a new key) and never deleted by the
//! operator (they outlive `helm uninstall`, like the data they protect).
//!
//! Two replicas starting at once both find the Secret absent and both create it: the API
//! server takes one and answers the other 409, which then reads the winner's value, so every
//! replica ends up with the same secret.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};

use crate::resources::MANAGED_BY;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("Secret {name}: {source}")]
    Api {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("Secret {name} has no key {key}")]
    MissingKey { name: String, key: String },
    #[error("generating {name}: {message}")]
    Generate { name: String, message: String },
}

/// The value under `key` of the Secret `name`, created with `generate()` if the Secret does
/// not exist.
pub async fn get_or_create(
    api: &Api<Secret>,
    name: &str,
    key: &str,
    generate: impl FnOnce() -> Result<Vec<u8>, String>,
) -> Result<Vec<u8>, SecretError> {
    let api_error = |source| SecretError::Api {
        name: name.into(),
        source,
    };
    if let Some(secret) = api.get_opt(name).await.map_err(api_error)? {
        return value(&secret, name, key);
    }
    let generated = generate().map_err(|message| SecretError::Generate {
        name: name.into(),
        message,
    })?;
    match api
        .create(
            &PostParams::default(),
            &secret(name, key, generated.clone()),
        )
        .await
    {
        Ok(_) => {
            tracing::info!(secret = name, "generated and stored a new secret");
            Ok(generated)
        }
        // Another replica created it first: use its value, not ours.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let secret = api.get(name).await.map_err(api_error)?;
            value(&secret, name, key)
        }
        Err(e) => Err(api_error(e)),
    }
}

/// Creates the Secret `name` with `generate()` under `key` unless it exists, without reading
/// it (so the operator needs no right to read Secrets where it makes them): an existing
/// Secret, made by an earlier pass or by a user with a token of their choosing, is kept.
pub async fn create_if_absent(
    api: &Api<Secret>,
    name: &str,
    key: &str,
    generate: impl FnOnce() -> Result<Vec<u8>, String>,
) -> Result<bool, SecretError> {
    let generated = generate().map_err(|message| SecretError::Generate {
        name: name.into(),
        message,
    })?;
    match api
        .create(&PostParams::default(), &secret(name, key, generated))
        .await
    {
        Ok(_) => {
            tracing::info!(secret = name, "generated and stored a new secret");
            Ok(true)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(source) => Err(SecretError::Api {
            name: name.into(),
            source,
        }),
    }
}

fn secret(name: &str, key: &str, value: Vec<u8>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([(MANAGED_BY.0.into(), MANAGED_BY.1.into())])),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(key.into(), ByteString(value))])),
        ..Default::default()
    }
}

fn value(secret: &Secret, name: &str, key: &str) -> Result<Vec<u8>, SecretError> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone())
        .ok_or_else(|| SecretError::MissingKey {
            name: name.into(),
            key: key.into(),
        })
}
