//! The redb files that hold what only their owner may read (a gateway's mailbox, a
//! client's reply SURBs and inbox): created with their directory, mode 0600.

use std::path::Path;

use redb::Database;

/// Opens (or creates) the database at `path`, its parent directories first, readable and
/// writable by its owner only.
pub fn open(path: &Path) -> Result<Database, String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let db = Database::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(db)
}
