//! The listening socket, created so that nothing else is ever touched:
//! - a path where a live daemon answers is refused;
//! - only a stale *socket* (one nobody listens on) is replaced; a regular file, a directory, a
//!   symlink or anything else at the path is a startup error that leaves it as it was;
//! - the socket is bound inside a fresh private directory (mode 0700) beside the path, given
//!   its mode and group there, and only then hard-linked to the path (`link` never replaces an
//!   existing file), so it is never reachable with looser permissions, and no process-wide
//!   state (the umask) changes while other threads run.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use tokio::net::UnixListener;

/// What is at the socket path, in words, for an error message.
fn kind_of(t: &fs::FileType) -> &'static str {
    if t.is_symlink() {
        "a symbolic link"
    } else if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else {
        "a special file"
    }
}

/// Clear the way for the socket: nothing there, or a stale socket removed.
fn clear_stale(path: &Path) -> anyhow::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", path.display())),
    };
    let t = meta.file_type();
    if !t.is_socket() {
        bail!(
            "{} exists and is {}, not a socket; refusing to replace it",
            path.display(),
            kind_of(&t)
        );
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => bail!(
            "{} is in use by a live daemon; refusing to start",
            path.display()
        ),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))?;
            tracing::info!(socket = %path.display(), "removed a stale socket");
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("probing {}", path.display())),
    }
}

/// Check, before a model takes minutes to load, that a socket can be made at `path`: its
/// directory exists, nothing but a stale socket is there, and `group` exists. Nothing is
/// changed (a stale socket is removed only by [`bind_socket`]).
pub fn preflight_socket(path: &Path, group: Option<&str>) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        bail!(
            "cannot create the socket {}: the directory {} does not exist",
            path.display(),
            dir.display()
        );
    }
    if let Ok(meta) = fs::symlink_metadata(path) {
        let t = meta.file_type();
        if !t.is_socket() {
            bail!(
                "{} exists and is {}, not a socket; refusing to replace it",
                path.display(),
                kind_of(&t)
            );
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "{} is in use by a live daemon; refusing to start",
                path.display()
            );
        }
    }
    group.map(group_id).transpose()?;
    Ok(())
}

/// A group name or number to a gid.
fn group_id(name: &str) -> anyhow::Result<u32> {
    if let Ok(gid) = name.parse() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => bail!("unknown group {name:?}"),
        Err(e) => Err(e).with_context(|| format!("looking up group {name:?}")),
    }
}

/// Removes the private staging directory (and anything left in it) when dropped.
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Bind the daemon's socket at `path` with `mode` and optional `group`.
pub fn bind_socket(path: &Path, mode: u32, group: Option<&str>) -> anyhow::Result<UnixListener> {
    clear_stale(path)?;
    let gid = group.map(group_id).transpose()?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        anyhow::bail!(
            "cannot create the socket {}: the directory {} does not exist",
            path.display(),
            dir.display()
        );
    }
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let staging = Staging(dir.join(format!(
        ".{}.{}.{nanos}",
        name.to_string_lossy(),
        std::process::id()
    )));
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging.0)
        .with_context(|| format!("creating {}", staging.0.display()))?;
    let staged = staging.0.join("sock");
    let listener =
        UnixListener::bind(&staged).with_context(|| format!("binding {}", path.display()))?;
    fs::set_permissions(&staged, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(&staged, None, Some(gid))
            .with_context(|| format!("giving {} to group {gid}", path.display()))?;
    }
    fs::hard_link(&staged, path).with_context(|| {
        format!(
            "placing the socket at {} (something appeared there meanwhile?)",
            path.display()
        )
    })?;
    Ok(listener)
}

/// Open files kept for the daemon's own use (the model file, logs, the runtime, the step log)
/// under a large limit; see [`daemon_reserve`].
pub const FD_RESERVE: u64 = 256;

/// Allow as many open files as the hard limit permits (thousands of client connections);
/// returns the limit now in force, when it could be read.
pub fn raise_fd_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            tracing::warn!(error = %e, "could not raise the open-file limit");
            return Some(soft);
        }
    }
    Some(hard.max(soft))
}

/// Open files kept for the daemon itself under an open-file limit of `limit`.
pub fn daemon_reserve(limit: u64) -> u64 {
    FD_RESERVE.min(limit / 4)
}

/// The socket connections an open-file limit of `limit` holds when `wanted` are asked for and
/// `others` descriptors go to HTTP clients and render workers: each connection holds one
/// descriptor, and [`daemon_reserve`] stay for the daemon. Past the limit `accept` fails, and a
/// client waits unanswered instead of hearing `too_many_connections`. At least one connection
/// is always allowed (the accept loop backs off at `EMFILE` rather than spin).
pub fn connections_within(limit: u64, wanted: usize, others: usize) -> usize {
    let reserve = daemon_reserve(limit);
    let room = limit.saturating_sub(reserve.saturating_add(others as u64));
    wanted
        .min(usize::try_from(room).unwrap_or(usize::MAX))
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("convoy-socket-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn connections_fit_the_open_file_limit() {
        assert_eq!(connections_within(1 << 20, 16384, 3 * 1024), 16384);
        assert_eq!(
            connections_within(20_000, 16384, 4 * 1024),
            20_000 - 256 - 4 * 1024
        );
        assert_eq!(connections_within(4000, 16384, 0), 4000 - 256);
        assert_eq!(connections_within(400, 16384, 12), 288);
        assert_eq!(connections_within(200, 16384, 0), 150);
        assert_eq!(connections_within(64, 16384, 12), 36);
        assert_eq!(connections_within(64, 16384, 1000), 1);
        assert_eq!(connections_within(u64::MAX, 5, 1 << 40), 5);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_regular_file_a_symlink_or_a_directory_is_never_replaced() {
        let d = scratch("refuse");
        let file = d.join("file");
        fs::write(&file, b"precious").unwrap();
        let err = bind_socket(&file, 0o600, None).unwrap_err().to_string();
        assert!(err.contains("regular file"), "{err}");
        assert_eq!(fs::read(&file).unwrap(), b"precious");
        let link = d.join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let err = bind_socket(&link, 0o600, None).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        let sub = d.join("dir");
        fs::create_dir(&sub).unwrap();
        assert!(bind_socket(&sub, 0o600, None).is_err());
        assert!(sub.is_dir());
        // Nothing staged is left behind.
        let left: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 3, "{left:?}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_stale_socket_is_replaced_and_a_live_one_refused() {
        let d = scratch("stale");
        let path = d.join("s.sock");
        let first = bind_socket(&path, 0o600, None).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let err = bind_socket(&path, 0o600, None).unwrap_err().to_string();
        assert!(err.contains("live daemon"), "{err}");
        drop(first); // the file stays, nobody listens: stale
        assert!(fs::symlink_metadata(&path).unwrap().file_type().is_socket());
        let _second = bind_socket(&path, 0o660, None).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        assert_eq!(fs::read_dir(&d).unwrap().count(), 1, "staging removed");
        fs::remove_dir_all(&d).unwrap();
    }
}
