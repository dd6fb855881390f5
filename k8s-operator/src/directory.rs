//! The directory key: the ed25519 key every topology document is signed with. The operator
//! owns it: it lives in a Secret in the operator's own namespace, made on first start (see
//! `generated_secret`), and its public half is published in a ConfigMap of the same name
//! (key `publicKey`) and in every `NymNode`'s status, where users and charts read it.
//! A key file (`NYM_OPERATOR_DIRECTORY_KEY`) replaces the Secret for runs outside a cluster.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use nym_node::keys::Identity;

use crate::controller::FIELD_MANAGER;
use crate::generated_secret::{self, SecretError};
use crate::resources::MANAGED_BY;

/// Key of the private key in the Secret (a PKCS#8 PEM ed25519 key).
pub const SECRET_KEY: &str = "directory.key";
/// Key of the base58 public key in the ConfigMap.
pub const PUBLIC_KEY: &str = "publicKey";

#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("Secret {0}, key {SECRET_KEY}: not an ed25519 private key (PKCS#8 PEM or base58)")]
    NotAKey(String),
    #[error("publishing the public key in ConfigMap {name}: {source}")]
    Publish {
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// The directory key from the Secret `name` in `namespace`, made if absent.
pub async fn load_or_create(
    client: Client,
    namespace: &str,
    name: &str,
) -> Result<Identity, DirectoryError> {
    let secrets: Api<Secret> = Api::namespaced(client, namespace);
    let text = generated_secret::get_or_create(&secrets, name, SECRET_KEY, || {
        Identity::generate()
            .map(|k| k.to_pkcs8_pem().into_bytes())
            .map_err(|e| e.to_string())
    })
    .await?;
    std::str::from_utf8(&text)
        .ok()
        .and_then(Identity::from_key_text)
        .ok_or_else(|| DirectoryError::NotAKey(name.into()))
}

/// Publishes the public half in the ConfigMap `name` of `namespace`.
pub async fn publish_public_key(
    client: Client,
    namespace: &str,
    name: &str,
    key: &Identity,
) -> Result<(), DirectoryError> {
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(MANAGED_BY.0.into(), MANAGED_BY.1.into())])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            PUBLIC_KEY.to_string(),
            key.public().to_base58(),
        )])),
        ..Default::default()
    };
    Api::<ConfigMap>::namespaced(client, namespace)
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&cm),
        )
        .await
        .map_err(|source| DirectoryError::Publish {
            name: name.into(),
            source,
        })?;
    Ok(())
}
