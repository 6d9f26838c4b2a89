//! Files a party keeps: written atomically (a reader never sees a half-written model or
//! config) and private to the user the party runs as. Every file medfed writes into its
//! state is created mode 0600 and every directory 0700, whatever the process umask, and
//! [`check_private`] is the one place that refuses to go on with state other users can
//! open.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The mode of every file a party creates: read and write by its owner only.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// The mode of every directory a party creates.
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// The permission bits of group and others: none may be set on a party's state.
const GROUP_OTHER: u32 = 0o077;

/// Writes `contents` to `path` through a temporary file in the same directory, synced and
/// renamed into place, and the directory synced (on Unix) so that the rename itself
/// survives a crash. The file is readable by its owner only (mode 0600 on Unix) from the
/// moment it is created; missing parent directories are created mode 0700.
pub fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    create_private_dir(parent)?;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = parent.join(name);
    remove_if_present(&tmp)?;
    let mut f = private_file_options()
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    #[cfg(unix)]
    std::fs::File::open(parent)?.sync_all()?;
    Ok(())
}

/// [`write_atomic`], for a secret: the same owner-only file, named for what it holds.
pub fn write_secret_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    write_atomic(path, contents)
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Open options that create a file readable and writable by its owner only (mode 0600 on
/// Unix); add `.append(true).create(true)` or the like.
pub fn private_file_options() -> std::fs::OpenOptions {
    #[allow(unused_mut)] // used on Unix only
    let mut opts = std::fs::OpenOptions::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(PRIVATE_FILE_MODE);
    }
    opts
}

/// Creates `dir` and any missing parents mode 0700 (on Unix). Existing directories are
/// left as they are: [`check_private`] finds those others can open.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(PRIVATE_DIR_MODE);
    }
    builder.create(dir)
}

/// Takes group and other permissions off `path` and, for a directory, off everything in
/// it (for files a library creates with its own mode, such as a store's). Symbolic links
/// are not followed.
#[cfg_attr(not(unix), allow(unused_variables))]
pub fn make_private(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::symlink_metadata(path)?;
        if meta.file_type().is_symlink() {
            return Ok(());
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & GROUP_OTHER != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & !GROUP_OTHER))?;
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(path)? {
                make_private(&entry?.path())?;
            }
        }
    }
    Ok(())
}

/// Sets the process's file-creation mask to `mask` and returns the previous one (Unix;
/// elsewhere it does nothing and returns 0). The mask is the whole process's: the `medfed`
/// command sets 0o077 once at start, as a backstop to the modes set where files are made.
#[cfg_attr(not(unix), allow(unused_variables))]
pub fn set_umask(mask: u32) -> u32 {
    #[cfg(unix)]
    {
        use rustix::fs::Mode;
        rustix::process::umask(Mode::from_bits_truncate(mask as _)).bits() as u32
    }
    #[cfg(not(unix))]
    {
        0
    }
}

/// A file or directory of a party's state that must be its owner's alone, and what it is
/// (for messages: "the node's state directory").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivatePath {
    /// What it is, in words (e.g. "the node's state directory").
    pub what: String,
    /// Where it is.
    pub path: PathBuf,
}

impl PrivatePath {
    /// `what` at `path`.
    pub fn new(what: impl Into<String>, path: impl Into<PathBuf>) -> PrivatePath {
        PrivatePath {
            what: what.into(),
            path: path.into(),
        }
    }
}

/// A path of a party's state that other users can open, or that could not be checked.
#[derive(Debug)]
#[non_exhaustive]
pub enum NotPrivate {
    /// Group or other users have permissions on it (or on something inside it).
    Exposed {
        /// What it is, in words.
        what: String,
        /// The path as configured.
        root: PathBuf,
        /// The file or directory with group or other permissions (`root` or inside it).
        path: PathBuf,
        /// Its permission bits (e.g. `0o644`).
        mode: u32,
        /// The command that fixes it.
        fix: String,
    },
    /// Its permissions could not be read.
    Io {
        /// What it is, in words.
        what: String,
        /// The path that could not be checked.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
}

impl std::fmt::Display for NotPrivate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotPrivate::Exposed { fix, .. } => write!(
                f,
                "{}; it must be readable by this user only: run `{fix}`",
                self.problem()
            ),
            NotPrivate::Io { what, path, source } => write!(
                f,
                "{what} {}: cannot check who may open it: {source}",
                path.display()
            ),
        }
    }
}

impl std::error::Error for NotPrivate {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            NotPrivate::Io { source, .. } => Some(source),
            NotPrivate::Exposed { .. } => None,
        }
    }
}

impl NotPrivate {
    /// What is wrong, without the fix (for reports that show the fix on its own line).
    pub fn problem(&self) -> String {
        match self {
            NotPrivate::Exposed {
                what,
                root,
                path,
                mode,
                ..
            } if root == path => {
                format!(
                    "{what} {} is open to other users (mode {mode:o})",
                    path.display()
                )
            }
            NotPrivate::Exposed {
                what,
                root,
                path,
                mode,
                ..
            } => format!(
                "{what} {}: {} is open to other users (mode {mode:o})",
                root.display(),
                path.display()
            ),
            NotPrivate::Io { what, path, source } => format!(
                "{what} {}: cannot check who may open it: {source}",
                path.display()
            ),
        }
    }

    /// The command that fixes the problem, if there is one.
    pub fn fix(&self) -> Option<&str> {
        match self {
            NotPrivate::Exposed { fix, .. } => Some(fix),
            NotPrivate::Io { .. } => None,
        }
    }
}

/// Whether a [`PrivatePath`] exists (it was checked) or not yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// It exists, and only its owner can open it (for a directory, nor anything in it).
    Private,
    /// It does not exist yet (the party creates it private).
    Missing,
}

/// Checks every path that exists: no group or other permission bit may be set on it nor,
/// for a directory, on anything in it (symbolic links are not followed inside). Returns the
/// first problem, naming the path and the command that fixes it.
pub fn check_private(paths: &[PrivatePath]) -> Result<(), NotPrivate> {
    for p in paths {
        check_one(p)?;
    }
    Ok(())
}

/// [`check_private`] of one path, telling whether it exists.
#[cfg_attr(not(unix), allow(unused_variables))]
pub fn check_one(p: &PrivatePath) -> Result<Presence, NotPrivate> {
    let io = |path: &Path, source| NotPrivate::Io {
        what: p.what.clone(),
        path: path.to_path_buf(),
        source,
    };
    let meta = match std::fs::metadata(&p.path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Presence::Missing),
        Err(e) => return Err(io(&p.path, e)),
    };
    let fix = if meta.is_dir() {
        format!("chmod -R go-rwx {}", p.path.display())
    } else {
        format!("chmod 600 {}", p.path.display())
    };
    let exposed = |path: &Path, mode: u32| NotPrivate::Exposed {
        what: p.what.clone(),
        root: p.path.clone(),
        path: path.to_path_buf(),
        mode,
        fix: fix.clone(),
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & GROUP_OTHER != 0 {
            return Err(exposed(&p.path, mode));
        }
        if meta.is_dir() {
            let mut stack = vec![p.path.clone()];
            while let Some(dir) = stack.pop() {
                let entries = std::fs::read_dir(&dir).map_err(|e| io(&dir, e))?;
                for entry in entries {
                    let entry = entry.map_err(|e| io(&dir, e))?;
                    let path = entry.path();
                    let meta = std::fs::symlink_metadata(&path).map_err(|e| io(&path, e))?;
                    if meta.file_type().is_symlink() {
                        continue;
                    }
                    let mode = meta.permissions().mode() & 0o7777;
                    if mode & GROUP_OTHER != 0 {
                        return Err(exposed(&path, mode));
                    }
                    if meta.is_dir() {
                        stack.push(path);
                    }
                }
            }
        }
    }
    Ok(Presence::Private)
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn files_and_directories_are_made_owner_only_under_a_permissive_umask() {
        // The usual default mask: new files 0644 and directories 0755 unless a mode is set.
        set_umask(0o022);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a/b/model.json");
        write_atomic(&file, b"{}").unwrap();
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(&dir.path().join("a")), 0o700);
        assert_eq!(mode(&dir.path().join("a/b")), 0o700);
        write_atomic(&file, b"{\"again\": 1}").unwrap();
        assert_eq!(mode(&file), 0o600);
        let log = dir.path().join("c/log");
        create_private_dir(&dir.path().join("c")).unwrap();
        private_file_options()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        assert_eq!((mode(&dir.path().join("c")), mode(&log)), (0o700, 0o600));
        check_private(&[PrivatePath::new("test state", dir.path().join("a"))]).unwrap();
    }

    #[test]
    fn open_state_is_refused_with_the_path_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        create_private_dir(&state.join("inner")).unwrap();
        let ledger = state.join("inner/ledger.json");
        write_atomic(&ledger, b"{}").unwrap();
        let paths = [
            PrivatePath::new("the node's state directory", &state),
            PrivatePath::new("the privacy ledger", &ledger),
            PrivatePath::new("the approvals file", dir.path().join("absent.txt")),
        ];
        check_private(&paths).unwrap();
        assert_eq!(check_one(&paths[2]).unwrap(), Presence::Missing);

        std::fs::set_permissions(&ledger, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = check_private(&paths).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&format!(
                "the node's state directory {}: {} is open to other users (mode 644)",
                state.display(),
                ledger.display()
            )),
            "{text}"
        );
        assert_eq!(
            err.fix(),
            Some(format!("chmod -R go-rwx {}", state.display()).as_str())
        );
        let err = check_private(&paths[1..]).unwrap_err();
        assert_eq!(
            err.fix(),
            Some(format!("chmod 600 {}", ledger.display()).as_str())
        );

        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
        let text = check_private(&paths).unwrap_err().to_string();
        assert!(text.contains("(mode 755)"), "{text}");
        make_private(&state).unwrap();
        assert_eq!((mode(&state), mode(&ledger)), (0o700, 0o600));
        check_private(&paths).unwrap();
    }
}
