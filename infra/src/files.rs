//! Atomic file writes: a reader never sees a half-written model or config.

use std::io::Write;
use std::path::Path;

/// Writes `contents` to `path` through a temporary file in the same directory, synced and
/// renamed into place. Creates the parent directory.
pub fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = parent.join(name);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
