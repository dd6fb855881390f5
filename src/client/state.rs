//! A client's state directory: what makes `nym-client --id NAME` the same client every time.
//!
//! ```text
//! DATA_DIR/NAME/
//!   client-identity.key   ed25519 identity (mode 0600); the encryption key derives from it
//!   client.json           the gateway chosen at init, and the topology source
//!   surbs.redb            reply SURBs received and handed out (mode 0600)
//!   stamps.json           registration stamps made for gateways (made once, kept)
//!   run.lock              held (flock) by the one process that holds the gateway session
//!   run.json              the running client's WebSocket address (and API token), while it runs
//! ```
//!
//! `DATA_DIR` is `NYM_CLIENT_DATA_DIR`, else `$XDG_DATA_HOME/nym-client`, else
//! `~/.local/share/nym-client`.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::keys::{Identity, NodeId};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{0}: no client here; create it with `nym-client init`")]
    Missing(PathBuf),
    #[error("{0}: a client already exists here")]
    Exists(PathBuf),
    #[error("{path}: {error}")]
    Corrupt { path: PathBuf, error: String },
    #[error(
        "no data directory: set NYM_CLIENT_DATA_DIR (or XDG_DATA_HOME or HOME), or pass --identity DIR"
    )]
    NoDataDir,
    #[error("client name {0:?}: use letters, digits, '-', '_' and '.' only")]
    BadName(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |error| StateError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// Where named clients live.
pub fn data_dir(env: impl Fn(&str) -> Option<String>) -> Result<PathBuf, StateError> {
    if let Some(d) = env("NYM_CLIENT_DATA_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    if let Some(d) = env("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("nym-client"));
    }
    env("HOME")
        .filter(|d| !d.is_empty())
        .map(|h| PathBuf::from(h).join(".local/share/nym-client"))
        .ok_or(StateError::NoDataDir)
}

/// The directory of the client called `name`.
pub fn named(data_dir: &Path, name: &str) -> Result<PathBuf, StateError> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        return Err(StateError::BadName(name.to_string()));
    }
    Ok(data_dir.join(name))
}

/// What `client.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Settings {
    /// The gateway this client registered with; its address names it, so it never changes.
    pub gateway: NodeId,
    /// Topology source given at init, used when no `--topology` is given later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<String>,
    /// The directory key every topology document must be signed by, given at init.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_signer: Option<crate::keys::KeyBytes>,
    /// Made with `--insecure-unsigned-topology`: takes documents no directory signed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unsigned_topology: bool,
}

/// What `run.json` holds while `nym-client run` serves.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Running {
    pub websocket: std::net::SocketAddr,
    pub pid: u32,
    /// The token the API requires (`run --require-token`); only the client's owner can
    /// read this file's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

pub struct ClientDir {
    pub path: PathBuf,
}

impl ClientDir {
    pub fn new(path: PathBuf) -> Self {
        ClientDir { path }
    }

    pub fn identity_file(&self) -> PathBuf {
        self.path.join("client-identity.key")
    }

    fn settings_file(&self) -> PathBuf {
        self.path.join("client.json")
    }

    /// The last good topology document (a restart never takes an older revision).
    pub fn topology(&self) -> PathBuf {
        self.path.join("topology.json")
    }

    /// Ids of messages taken for good (see `client::completed`).
    pub fn completed_ids(&self) -> PathBuf {
        self.path.join("completed")
    }

    /// Fragments of incomplete messages (see [`super::inbox`]).
    pub fn inbox(&self) -> PathBuf {
        self.path.join("inbox.redb")
    }

    pub fn surb_store(&self) -> PathBuf {
        self.path.join("surbs.redb")
    }

    pub fn stamps(&self) -> PathBuf {
        self.path.join("stamps.json")
    }

    fn running_file(&self) -> PathBuf {
        self.path.join("run.json")
    }

    /// Creates the identity (mode 0600) and settings; refuses to replace an existing client.
    pub fn create(&self, identity: &Identity, settings: &Settings) -> Result<(), StateError> {
        if self.settings_file().exists() {
            return Err(StateError::Exists(self.path.clone()));
        }
        std::fs::create_dir_all(&self.path).map_err(io(&self.path))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o700))
                .map_err(io(&self.path))?;
        }
        if !self.identity_file().exists() {
            identity
                .write(&self.identity_file())
                .map_err(|e| StateError::Corrupt {
                    path: self.identity_file(),
                    error: e.to_string(),
                })?;
        }
        write_atomically(&self.settings_file(), &to_json(settings))
    }

    pub fn identity(&self) -> Result<Identity, StateError> {
        if !self.identity_file().exists() {
            return Err(StateError::Missing(self.path.clone()));
        }
        Identity::load(&self.identity_file()).map_err(|e| StateError::Corrupt {
            path: self.identity_file(),
            error: e.to_string(),
        })
    }

    /// The settings, or `None` for a directory made by an older `init` (identity only).
    pub fn settings(&self) -> Result<Option<Settings>, StateError> {
        let path = self.settings_file();
        match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| StateError::Corrupt {
                        path,
                        error: e.to_string(),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StateError::Io { path, error: e }),
        }
    }

    pub fn save_settings(&self, settings: &Settings) -> Result<(), StateError> {
        write_atomically(&self.settings_file(), &to_json(settings))
    }

    /// Takes the session lock without waiting: `None` when another process holds it.
    pub fn try_lock(&self) -> Result<Option<SessionLock>, StateError> {
        let path = self.path.join("run.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        // SAFETY: flock on a descriptor we own; the lock goes when the file is closed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        Ok((rc == 0).then_some(SessionLock { _file: file }))
    }

    pub fn write_running(&self, running: &Running) -> Result<(), StateError> {
        write_atomically(&self.running_file(), &to_json(running))
    }

    pub fn clear_running(&self) {
        let _ = std::fs::remove_file(self.running_file());
    }

    /// Where the running client serves, if one holds the session lock.
    pub fn running(&self) -> Result<Option<Running>, StateError> {
        if self.try_lock()?.is_some() {
            return Ok(None); // nobody holds it: whatever run.json says is stale
        }
        let path = self.running_file();
        match std::fs::read(&path) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
            Err(_) => Ok(None),
        }
    }
}

/// Held while a process owns the client's gateway session.
pub struct SessionLock {
    _file: File,
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(v).unwrap_or_default();
    out.push(b'\n');
    out
}

/// Writes `path` so a crash leaves the old content or the new, never half of one.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_dir_follows_the_environment_in_order() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            data_dir(env(&[("NYM_CLIENT_DATA_DIR", "/a"), ("HOME", "/h")])).unwrap(),
            PathBuf::from("/a")
        );
        assert_eq!(
            data_dir(env(&[("XDG_DATA_HOME", "/x"), ("HOME", "/h")])).unwrap(),
            PathBuf::from("/x/nym-client")
        );
        assert_eq!(
            data_dir(env(&[("HOME", "/h")])).unwrap(),
            PathBuf::from("/h/.local/share/nym-client")
        );
        assert!(matches!(data_dir(env(&[])), Err(StateError::NoDataDir)));
    }

    #[test]
    fn names_cannot_escape_the_data_dir() {
        for bad in ["", "..", "a/b", "../x", "a b"] {
            assert!(named(Path::new("/d"), bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            named(Path::new("/d"), "alice-1").unwrap(),
            PathBuf::from("/d/alice-1")
        );
    }

    #[test]
    fn a_client_is_created_once_and_reads_back_the_same() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ClientDir::new(tmp.path().join("alice"));
        assert!(matches!(dir.identity(), Err(StateError::Missing(_))));
        let id = Identity::generate().unwrap();
        let settings = Settings {
            gateway: crate::keys::KeyBytes([3; 32]),
            topology: Some("/t.json".into()),
            topology_signer: Some(crate::keys::KeyBytes([4; 32])),
            unsigned_topology: false,
        };
        dir.create(&id, &settings).unwrap();
        assert!(matches!(
            dir.create(&Identity::generate().unwrap(), &settings),
            Err(StateError::Exists(_))
        ));
        assert_eq!(dir.identity().unwrap().public(), id.public());
        assert_eq!(dir.settings().unwrap(), Some(settings));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.identity_file())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "identity readable by others");
    }

    #[test]
    fn one_process_holds_the_session_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ClientDir::new(tmp.path().to_path_buf());
        let held = dir.try_lock().unwrap().expect("free");
        // flock locks belong to the open file description: a second open conflicts.
        assert!(dir.try_lock().unwrap().is_none());
        dir.write_running(&Running {
            token: None,
            websocket: "127.0.0.1:1977".parse().unwrap(),
            pid: 1,
        })
        .unwrap();
        assert_eq!(dir.running().unwrap().unwrap().pid, 1);
        drop(held);
        assert!(dir.running().unwrap().is_none(), "stale run.json ignored");
    }
}
