//! The state on disk: the installation's device id, one file per session, and one login
//! history per `unique_user_id` (the rate budget, counted across restarts).
//!
//! Layout under the state directory (mode 0700): `lock`, `installation.json`,
//! `sessions/<id>.json`, `logins/<unique_user_id>.json`, each mode 0600. A [`Store`] holds
//! an exclusive `flock` on `lock` for as long as it (or a clone) lives, so a second daemon
//! on the same directory fails to open it ([`StoreError::Locked`]). Files are written
//! atomically (temporary file `.<name>.tmp-<pid>-<random>` created with `create_new`,
//! fsync, rename, fsync of the directory), so a kill -9 at any moment leaves the old or the
//! new file; the temporary files such a kill leaves behind are removed when the store is
//! opened. A file that does not parse is moved aside as `<name>.corrupt-<unix
//! time>-<n>` (mode 0600, kept for inspection; the oldest beyond [`MAX_ASIDE`] copies of a
//! file are removed) and reported as [`StoreError::Corrupt`]. Errors are returned, not
//! logged here (the one exception: [`Store::device_id`] replaces a corrupt id and logs it):
//! the caller decides. Functions here block; the runtime calls them from `spawn_blocking`.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::ops::{Deref, DerefMut};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::secret::Secret;

/// Format version of every file written here.
pub const FORMAT_VERSION: u32 = 1;

/// How many moved-aside copies of one state file are kept.
pub const MAX_ASIDE: usize = 3;

/// A storage failure, naming the path; never a secret.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O operation failed.
    #[error("{path}: {what}: {source}")]
    Io {
        /// The file or directory concerned.
        path: String,
        /// What was being done.
        what: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Another process (another instance of the daemon) holds the state directory's lock.
    #[error("{path}: the state directory is in use by another entrupy-tokend")]
    Locked {
        /// The lock file.
        path: String,
    },
    /// A state file did not parse; it was moved aside.
    #[error("{path}: cannot be read back ({detail}); moved aside to {moved_to}")]
    Corrupt {
        /// The state file.
        path: String,
        /// Where it is now.
        moved_to: String,
        /// Where and why parsing stopped (no content).
        detail: String,
    },
    /// A session id or `unique_user_id` that cannot name a state file.
    #[error("{what} {name:?} cannot name a state file")]
    InvalidName {
        /// `session id` or `unique_user_id`.
        what: &'static str,
        /// The name.
        name: String,
    },
    /// A record could not be serialized; nothing was written.
    #[error("{path}: cannot serialize the state: {source}")]
    Serialize {
        /// The file that was to be written.
        path: String,
        /// The serializer's error (it names no value).
        #[source]
        source: serde_json::Error,
    },
}

impl StoreError {
    /// True for [`StoreError::Locked`]: another instance runs (the daemon exits 69).
    pub fn is_locked(&self) -> bool {
        matches!(self, StoreError::Locked { .. })
    }
}

fn err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { path: path.display().to_string(), what, source }
}

/// The profile of a session added over D-Bus (configured sessions take theirs from the
/// config file instead).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredProfile {
    /// Who the user is.
    #[serde(flatten)]
    pub profile: crate::profile::Profile,
    /// The app-user credential given to `AddSession`, if any.
    #[serde(default)]
    pub backend_token: Option<Secret>,
}

/// What is kept of one session.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SessionRecord {
    /// Format version.
    pub version: u32,
    /// The session id.
    pub id: String,
    /// Present for sessions added over D-Bus.
    pub profile: Option<StoredProfile>,
    /// The user the token belongs to (a token is dropped when this changes).
    pub unique_user_id: String,
    /// As returned by the backend, `""` until known.
    pub username: String,
    /// The token, when one is held.
    pub token: Option<Secret>,
    /// Exact expiry, Unix seconds.
    pub expires_at: Option<f64>,
    /// When the last login answer arrived.
    pub last_login_at: Option<f64>,
    /// The planned refresh.
    pub refresh_at: Option<f64>,
    /// Short error name of the last failure.
    pub last_error: Option<String>,
    /// True after `Cleanup`: no automatic login after a restart.
    pub logged_out: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct Installation {
    version: u32,
    device_id: String,
}

/// Login history of one user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoginHistory {
    /// Format version.
    pub version: u32,
    /// The user.
    pub unique_user_id: String,
    /// Unix seconds of logins (and of attempts under way, which count until they end).
    pub logins: Vec<f64>,
}

/// The state files of one kind that were read, by name (session id or `unique_user_id`),
/// and the errors of those that could not be (each names its file; a corrupt one was moved
/// aside). One bad file does not keep the others from loading; what to do about it is the
/// caller's decision. Derefs to the map of what was read, and iterates over it.
#[derive(Debug)]
pub struct Loaded<T> {
    /// What was read.
    pub items: BTreeMap<String, T>,
    /// What could not be, by name.
    pub failed: Vec<(String, StoreError)>,
}

impl<T> Loaded<T> {
    fn add(&mut self, key: &str, item: Result<Option<T>, StoreError>) {
        match item {
            Ok(Some(v)) => {
                self.items.insert(key.to_owned(), v);
            }
            Ok(None) => {}
            Err(e) => self.failed.push((key.to_owned(), e)),
        }
    }
}

impl<T> Default for Loaded<T> {
    fn default() -> Self {
        Loaded { items: BTreeMap::new(), failed: Vec::new() }
    }
}

impl<T> Deref for Loaded<T> {
    type Target = BTreeMap<String, T>;
    fn deref(&self) -> &Self::Target {
        &self.items
    }
}

impl<T> DerefMut for Loaded<T> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.items
    }
}

impl<T> IntoIterator for Loaded<T> {
    type Item = (String, T);
    type IntoIter = std::collections::btree_map::IntoIter<String, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.items.into_iter()
    }
}

/// The state directory, locked for as long as this value or a clone of it lives.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    /// The open lock file: the `flock` lasts as long as this open file description.
    _lock: Arc<File>,
}

/// Writes `bytes` to `path` atomically with mode 0600.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}-{:08x}", std::process::id(), rand::random::<u32>()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err(&tmp, "cannot create temporary file"))?;
        f.write_all(bytes).map_err(err(&tmp, "cannot write"))?;
        f.sync_all().map_err(err(&tmp, "cannot sync"))?;
        drop(f);
        fs::rename(&tmp, path).map_err(err(path, "cannot replace"))?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(err(dir, "cannot sync directory"))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// True for the name of a temporary file of [`write_atomic`]: `.<name>.tmp-<pid>-<8 hex>`.
/// State files end in `.json`, so none of them is mistaken for one, whatever it begins with.
fn is_temporary(name: &str) -> bool {
    let Some((orig, tail)) = name.strip_prefix('.').and_then(|rest| rest.rsplit_once(".tmp-")) else {
        return false;
    };
    let Some((pid, random)) = tail.split_once('-') else { return false };
    !orig.is_empty()
        && !pid.is_empty()
        && pid.bytes().all(|b| b.is_ascii_digit())
        && random.len() == 8
        && random.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Writes `value` as JSON to `path` atomically; a value that cannot be serialized writes
/// nothing and is an error.
fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec_pretty(value)
        .map_err(|source| StoreError::Serialize { path: path.display().to_string(), source })?;
    write_atomic(path, &bytes)
}

/// Creates a directory (and parents) with mode 0700; tightens an existing one we own.
fn ensure_dir(dir: &Path) -> Result<(), StoreError> {
    if !dir.is_dir() {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(err(dir, "cannot create directory"))?;
    }
    let meta = fs::metadata(dir).map_err(err(dir, "cannot inspect directory"))?;
    if meta.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(err(dir, "cannot set mode 0700"))?;
    }
    Ok(())
}

/// Takes the state directory's lock without waiting.
fn lock(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join("lock");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&path)
        .map_err(err(&path, "cannot open the lock file"))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(StoreError::Locked { path: path.display().to_string() }),
        Err(e) => Err(err(&path, "cannot lock")(e.into())),
    }
}

/// Removes the temporary files an interrupted [`write_atomic`] left in `dir`. Only called
/// with the lock held, so no write of ours is under way.
fn remove_temporaries(dir: &Path) -> Result<(), StoreError> {
    for entry in fs::read_dir(dir).map_err(err(dir, "cannot list"))? {
        let entry = entry.map_err(err(dir, "cannot list"))?;
        if entry.file_name().to_str().is_some_and(is_temporary) {
            let path = entry.path();
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(err(&path, "cannot remove an orphaned temporary file")(e)),
            }
        }
    }
    Ok(())
}

/// The order of a moved-aside copy: Unix seconds, then a sequence number within them.
type AsideKey = (u64, u64);

/// The order of a moved-aside copy of `file_name` (`<file_name>.corrupt-<secs>[-<n>]`),
/// if `name` is one.
fn aside_key(file_name: &str, name: &str) -> Option<AsideKey> {
    let suffix = name.strip_prefix(file_name)?.strip_prefix(".corrupt-")?;
    let (secs, n) = suffix.split_once('-').unwrap_or((suffix, "0"));
    Some((secs.parse().ok()?, n.parse().ok()?))
}

/// The moved-aside copies of `file_name` in `dir`, oldest first.
fn aside_copies(dir: &Path, file_name: &str) -> Result<Vec<(AsideKey, PathBuf)>, StoreError> {
    let mut copies = Vec::new();
    for entry in fs::read_dir(dir).map_err(err(dir, "cannot list"))? {
        let entry = entry.map_err(err(dir, "cannot list"))?;
        if let Some(key) = entry.file_name().to_str().and_then(|name| aside_key(file_name, name)) {
            copies.push((key, entry.path()));
        }
    }
    copies.sort();
    Ok(copies)
}

/// Renames `path` aside with mode 0600, under a name that no other copy has and that sorts
/// after every other copy (even within one second, or after the clock went back), then
/// removes the oldest copies beyond [`MAX_ASIDE`]. Returns the new name.
fn move_aside(path: &Path) -> Result<PathBuf, StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (mut secs, mut n) = match aside_copies(dir, &file_name)?.last() {
        Some(&((secs, n), _)) if secs >= now => (secs, n + 1),
        _ => (now, 0),
    };
    let aside = loop {
        let candidate = dir.join(format!("{file_name}.corrupt-{secs}-{n}"));
        (secs, n) = if n == u64::MAX { (secs + 1, 0) } else { (secs, n + 1) };
        if fs::symlink_metadata(&candidate).is_ok() {
            continue;
        }
        let cwd = rustix::fs::CWD;
        match rustix::fs::renameat_with(cwd, path, cwd, &candidate, rustix::fs::RenameFlags::NOREPLACE) {
            Ok(()) => break candidate,
            Err(rustix::io::Errno::EXIST) => continue,
            // A file system without RENAME_NOREPLACE: the name was free a moment ago, and
            // the lock keeps other instances of the daemon out.
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
                fs::rename(path, &candidate).map_err(err(path, "cannot move a corrupt file aside"))?;
                break candidate;
            }
            Err(e) => return Err(err(path, "cannot move a corrupt file aside")(e.into())),
        }
    };
    if !fs::symlink_metadata(&aside).is_ok_and(|m| m.file_type().is_symlink()) {
        fs::set_permissions(&aside, fs::Permissions::from_mode(0o600)).map_err(err(&aside, "cannot set mode 0600"))?;
    }
    let copies = aside_copies(dir, &file_name)?;
    let excess = copies.len().saturating_sub(MAX_ASIDE);
    for (_, old) in copies.into_iter().take(excess) {
        match fs::remove_file(&old) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(&old, "cannot remove an old moved-aside copy")(e)),
        }
    }
    Ok(aside)
}

/// Reads one JSON file: `None` when it does not exist; a file that does not parse is moved
/// aside and reported as [`StoreError::Corrupt`].
fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, StoreError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(path, "cannot read")(e)),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| corrupt(path, &e))
}

/// The error of a state file at `path` that does not parse, which is moved aside (an error
/// moving it is returned instead).
fn corrupt(path: &Path, e: &serde_json::Error) -> StoreError {
    // Position and category only: the message of a failed parse may quote content.
    let detail = format!("line {} column {}: {:?}", e.line(), e.column(), e.classify());
    match move_aside(path) {
        Ok(moved_to) => {
            StoreError::Corrupt { path: path.display().to_string(), moved_to: moved_to.display().to_string(), detail }
        }
        Err(e) => e,
    }
}

/// Reads the files of one directory, as the start reads 10,000 sessions and as many login
/// histories: each file is opened relative to the directory (one name to look up, not the
/// whole path), without updating its access time (the first read of files just written
/// would otherwise journal an inode update each), into one buffer kept from file to file (no
/// size query and no new buffer per file). About a third less time than `fs::read` per file.
struct DirReader {
    dir: std::os::fd::OwnedFd,
    path: PathBuf,
    buf: Vec<u8>,
    /// `O_NOATIME` is refused (`EPERM`) for a file the process does not own.
    noatime: bool,
}

impl DirReader {
    fn open(path: &Path) -> Result<Self, StoreError> {
        use rustix::fs::{Mode, OFlags};
        let dir = rustix::fs::open(path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| err(path, "cannot open")(e.into()))?;
        Ok(DirReader { dir, path: path.to_owned(), buf: vec![0; 16 * 1024], noatime: true })
    }

    /// The file's path, for messages and for moving it aside.
    fn path_of(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The bytes of the file `name`, `None` when it is gone.
    fn read(&mut self, name: &str) -> Result<Option<&[u8]>, StoreError> {
        use rustix::fs::{Mode, OFlags};
        use std::io::Read;
        let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY;
        let opened = match rustix::fs::openat(&self.dir, name, flags | self.noatime_flag(), Mode::empty()) {
            Err(rustix::io::Errno::PERM) if self.noatime => {
                self.noatime = false;
                rustix::fs::openat(&self.dir, name, flags, Mode::empty())
            }
            other => other,
        };
        let mut file = match opened {
            Ok(fd) => File::from(fd),
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => return Err(err(&self.path_of(name), "cannot read")(e.into())),
        };
        let mut filled = 0;
        loop {
            if filled == self.buf.len() {
                self.buf.resize(self.buf.len() * 2, 0);
            }
            match file.read(&mut self.buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(err(&self.path_of(name), "cannot read")(e)),
            }
        }
        Ok(Some(&self.buf[..filled]))
    }

    fn noatime_flag(&self) -> rustix::fs::OFlags {
        if self.noatime { rustix::fs::OFlags::NOATIME } else { rustix::fs::OFlags::empty() }
    }

    /// Reads and parses the file `name` (one that does not parse is moved aside).
    fn load<T: for<'de> Deserialize<'de>>(&mut self, name: &str) -> Result<Option<T>, StoreError> {
        let parsed = match self.read(name)? {
            Some(bytes) => serde_json::from_slice(bytes),
            None => return Ok(None),
        };
        // The path is made only for the rare file that does not parse.
        parsed.map(Some).map_err(|e| corrupt(&self.path_of(name), &e))
    }
}

impl Store {
    /// Opens (creating with mode 0700) the state directory and its subdirectories, takes its
    /// lock ([`StoreError::Locked`] when another process holds it) and removes the
    /// temporary files of interrupted writes.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        ensure_dir(dir)?;
        let lock = lock(dir)?;
        for d in [dir.to_owned(), dir.join("sessions"), dir.join("logins")] {
            ensure_dir(&d)?;
            remove_temporaries(&d)?;
        }
        Ok(Store { dir: dir.to_owned(), _lock: Arc::new(lock) })
    }

    fn session_path(&self, id: &str) -> Result<PathBuf, StoreError> {
        crate::config::validate_session_id(id)
            .map_err(|_| StoreError::InvalidName { what: "session id", name: id.to_owned() })?;
        Ok(self.dir.join("sessions").join(format!("{id}.json")))
    }

    fn logins_path(&self, uid: &str) -> Result<PathBuf, StoreError> {
        crate::config::validate_unique_user_id(uid)
            .map_err(|_| StoreError::InvalidName { what: "unique_user_id", name: uid.to_owned() })?;
        Ok(self.dir.join("logins").join(format!("{uid}.json")))
    }

    /// The installation's device id, made (random, 32 hex digits) and stored on first use,
    /// and again when the stored one is unreadable (a corrupt file is moved aside; this is
    /// logged, as the only error here that is not returned).
    pub fn device_id(&self) -> Result<String, StoreError> {
        let path = self.dir.join("installation.json");
        match read_json::<Installation>(&path) {
            Ok(Some(i)) if crate::authreq::is_device_id(&i.device_id) => return Ok(i.device_id),
            Ok(_) => {}
            Err(e @ StoreError::Corrupt { .. }) => tracing::warn!(error = %e, "making a new device id"),
            Err(e) => return Err(e),
        }
        let device_id = crate::authreq::random_hex128();
        write_json(&path, &Installation { version: FORMAT_VERSION, device_id: device_id.clone() })?;
        Ok(device_id)
    }

    /// Every stored session, by id, and the errors of the files that could not be read
    /// (corrupt ones are moved aside). Only listing the directory fails the whole call.
    pub fn load_sessions(&self) -> Result<Loaded<SessionRecord>, StoreError> {
        let key = |name: &str| {
            let id = name.strip_suffix(".json")?;
            crate::config::validate_session_id(id).ok().map(|_| id.to_owned())
        };
        let mut out = self.load_dir::<SessionRecord>("sessions", key)?;
        for (id, rec) in out.items.iter_mut() {
            rec.id.clone_from(id);
        }
        Ok(out)
    }

    /// One stored session: `None` when it has no file; an error for an invalid id, a file
    /// that cannot be read, or one that does not parse (moved aside).
    pub fn load_session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        Ok(read_json::<SessionRecord>(&self.session_path(id)?)?.map(|mut rec| {
            rec.id = id.to_owned();
            rec
        }))
    }

    /// Saves a session's record.
    pub fn save_session(&self, rec: &SessionRecord) -> Result<(), StoreError> {
        let path = self.session_path(&rec.id)?;
        let mut rec = rec.clone();
        rec.version = FORMAT_VERSION;
        write_json(&path, &rec)
    }

    /// Forgets a session's record, and the moved-aside copies of it.
    pub fn remove_session(&self, id: &str) -> Result<(), StoreError> {
        let path = self.session_path(id)?;
        let dir = self.dir.join("sessions");
        let prefix = format!("{id}.json.corrupt-");
        let mut doomed = vec![path];
        for entry in fs::read_dir(&dir).map_err(err(&dir, "cannot list"))? {
            let entry = entry.map_err(err(&dir, "cannot list"))?;
            if entry.file_name().to_str().is_some_and(|n| n.starts_with(&prefix)) {
                doomed.push(entry.path());
            }
        }
        for p in doomed {
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(err(&p, "cannot remove")(e)),
            }
        }
        Ok(())
    }

    /// Every stored login history, by user, and the errors of the files that could not be
    /// read (corrupt ones are moved aside).
    pub fn load_logins(&self) -> Result<Loaded<Vec<f64>>, StoreError> {
        // Temporary files end in random hex digits, never in `.json`; a history's name may
        // begin with a dot, as a `unique_user_id` may.
        let key = |name: &str| {
            let uid = name.strip_suffix(".json")?;
            crate::config::validate_unique_user_id(uid).ok().map(|_| uid.to_owned())
        };
        let loaded = self.load_dir::<LoginHistory>("logins", key)?;
        let items = loaded
            .items
            .into_iter()
            .map(|(uid, h)| (uid, h.logins.into_iter().filter(|t| t.is_finite()).collect()))
            .collect();
        Ok(Loaded { items, failed: loaded.failed })
    }

    /// Reads and parses every file of the subdirectory `sub` whose name `key` accepts (it
    /// gives the item's key), with one [`DirReader`].
    ///
    /// Tried and dropped: a second thread reading half of the files. It took the load of
    /// 10,000 sessions and 10,000 histories from about 140 ms to 90, but the one large
    /// buffer it handed over, once freed, raised glibc's mmap and trim thresholds, and the
    /// heap kept 2.4 MiB more with 10,000 sessions loaded.
    fn load_dir<T: for<'de> Deserialize<'de>>(
        &self,
        sub: &str,
        key: impl Fn(&str) -> Option<String>,
    ) -> Result<Loaded<T>, StoreError> {
        let dir = self.dir.join(sub);
        let mut out = Loaded::default();
        let mut reader = DirReader::open(&dir)?;
        for entry in fs::read_dir(&dir).map_err(err(&dir, "cannot list"))? {
            let entry = entry.map_err(err(&dir, "cannot list"))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(k) = key(&name) {
                out.add(&k, reader.load(&name));
            }
        }
        Ok(out)
    }

    /// Saves one user's login history.
    pub fn save_logins(&self, uid: &str, logins: &[f64]) -> Result<(), StoreError> {
        let path = self.logins_path(uid)?;
        let h = LoginHistory { version: FORMAT_VERSION, unique_user_id: uid.to_owned(), logins: logins.to_vec() };
        write_json(&path, &h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let store = Store::open(&dir).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        let dev = store.device_id().unwrap();
        assert_eq!(store.device_id().unwrap(), dev, "device id is kept");
        let rec = SessionRecord {
            id: "default".into(),
            unique_user_id: "user-0001".into(),
            token: Some(Secret::new("tok")),
            expires_at: Some(123.5),
            ..Default::default()
        };
        store.save_session(&rec).unwrap();
        let path = dir.join("sessions/default.json");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let loaded = store.load_sessions().unwrap();
        assert_eq!(loaded["default"].token, rec.token);
        assert_eq!(loaded["default"].expires_at, Some(123.5));
        let one = store.load_session("default").unwrap().unwrap();
        assert_eq!((one.id.as_str(), one.token), ("default", rec.token.clone()));
        assert!(store.load_session("other").unwrap().is_none());
        assert!(
            matches!(store.load_session("../default"), Err(StoreError::InvalidName { .. })),
            "ids are checked before use as paths"
        );
        assert!(store.save_session(&SessionRecord { id: "../x".into(), ..Default::default() }).is_err());
        assert!(store.save_logins("../../x/y", &[]).is_err());
        store.save_logins("user-0001", &[1.0, 2.0]).unwrap();
        assert_eq!(store.load_logins().unwrap()["user-0001"], vec![1.0, 2.0]);
        store.remove_session("default").unwrap();
        assert!(store.load_sessions().unwrap().is_empty());
        // No temporary files are left behind.
        let leftovers: Vec<_> = fs::read_dir(dir.join("sessions")).unwrap().collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn corrupt_files_are_moved_aside() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        fs::write(tmp.path().join("sessions/bad.json"), b"{not json").unwrap();
        fs::write(tmp.path().join("logins/user-0001.json"), b"\xff").unwrap();
        fs::write(tmp.path().join("installation.json"), b"[]").unwrap();
        assert!(store.load_sessions().unwrap().is_empty());
        assert!(store.load_logins().unwrap().is_empty());
        let dev = store.device_id().unwrap();
        assert!(crate::authreq::is_device_id(&dev));
        let names: Vec<String> = fs::read_dir(tmp.path().join("sessions"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().any(|n| n.starts_with("bad.json.corrupt-")), "{names:?}");
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn a_second_open_of_the_same_directory_is_locked_out() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let lock = tmp.path().join("lock");
        assert_eq!(fs::metadata(&lock).unwrap().permissions().mode() & 0o777, 0o600);
        // flock locks belong to open file descriptions, so a second open in this process
        // is refused as another process would be.
        let second = Store::open(tmp.path()).unwrap_err();
        assert!(second.is_locked() && matches!(second, StoreError::Locked { .. }), "{second}");
        assert!(second.to_string().contains("in use by another entrupy-tokend"), "{second}");
        // A clone shares the lock; it is released with the last one.
        let clone = store.clone();
        drop(store);
        assert!(Store::open(tmp.path()).unwrap_err().is_locked());
        drop(clone);
        let again = Store::open(tmp.path()).unwrap();
        // Another directory is another lock.
        let other = tempfile::tempdir().unwrap();
        let _both = (again, Store::open(other.path()).unwrap());
    }

    #[test]
    fn a_directory_that_cannot_be_written_is_an_io_error() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("not-a-dir");
        fs::write(&file, b"").unwrap();
        let e = Store::open(&file).unwrap_err();
        assert!(matches!(e, StoreError::Io { .. }) && !e.is_locked(), "{e}");
    }

    #[test]
    fn moved_aside_copies_are_unique_private_and_at_most_three() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let file = tmp.path().join("sessions/a.json");
        let mut moved = Vec::new();
        // Five corruptions within a second or two: every copy gets its own name.
        for i in 0..5 {
            fs::write(&file, format!("{{corrupt {i}")).unwrap();
            fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
            match store.load_session("a") {
                Err(StoreError::Corrupt { moved_to, path, detail }) => {
                    assert_eq!(path, file.display().to_string());
                    assert!(detail.starts_with("line 1 column"), "{detail}");
                    moved.push(PathBuf::from(moved_to));
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(!file.exists(), "the corrupt file is moved, not copied");
        let names = names_in(&tmp.path().join("sessions"));
        assert_eq!(names.len(), MAX_ASIDE, "{names:?}");
        // The newest three are kept, with their contents.
        for (i, path) in moved.iter().enumerate().skip(2) {
            assert_eq!(fs::read_to_string(path).unwrap(), format!("{{corrupt {i}"));
            assert_eq!(fs::metadata(path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert!(!moved[0].exists() && !moved[1].exists());
        // A copy of an older version of the daemon (no sequence number) counts, and is
        // older than the ones of this second.
        fs::write(tmp.path().join("sessions/a.json.corrupt-1000"), b"old").unwrap();
        fs::write(&file, b"[").unwrap();
        assert!(store.load_session("a").is_err());
        let names = names_in(&tmp.path().join("sessions"));
        assert_eq!(names.len(), MAX_ASIDE, "{names:?}");
        assert!(!names.contains(&"a.json.corrupt-1000".to_owned()), "{names:?}");
    }

    #[test]
    fn a_copy_made_after_the_clock_went_back_is_still_the_newest() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let future = "installation.json.corrupt-99999999999-7";
        fs::write(tmp.path().join(future), b"from the future").unwrap();
        for _ in 0..MAX_ASIDE {
            fs::write(tmp.path().join("installation.json"), b"{").unwrap();
            assert!(crate::authreq::is_device_id(&store.device_id().unwrap()));
        }
        let copies: Vec<String> =
            names_in(tmp.path()).into_iter().filter(|n| n.starts_with("installation.json.corrupt-")).collect();
        assert_eq!(
            copies,
            [
                "installation.json.corrupt-99999999999-10",
                "installation.json.corrupt-99999999999-8",
                "installation.json.corrupt-99999999999-9",
            ],
            "the oldest ({future}) went first"
        );
    }

    #[test]
    fn remove_session_removes_its_copies_only() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        for id in ["a", "ab"] {
            fs::write(tmp.path().join(format!("sessions/{id}.json")), b"{").unwrap();
            assert!(store.load_session(id).is_err());
            store.save_session(&SessionRecord { id: id.into(), ..Default::default() }).unwrap();
        }
        store.remove_session("a").unwrap();
        let names = names_in(&tmp.path().join("sessions"));
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.iter().all(|n| n.starts_with("ab.json")), "{names:?}");
        store.remove_session("never-saved").unwrap();
    }

    #[test]
    fn orphaned_temporary_files_are_removed_at_open() {
        let tmp = tempfile::tempdir().unwrap();
        drop(Store::open(tmp.path()).unwrap());
        let orphans = [
            ".installation.json.tmp-4242-0badcafe",
            "sessions/.default.json.tmp-1-00000000",
            "logins/..dotted-user.json.tmp-99-abcdef01",
        ];
        let kept = ["logins/.dotted-user.json", "sessions/.hidden", "sessions/x.json.tmp-1-00000000", "notes"];
        for name in orphans.iter().chain(&kept) {
            fs::write(tmp.path().join(name), b"{}").unwrap();
        }
        let _store = Store::open(tmp.path()).unwrap();
        for name in orphans {
            assert!(!tmp.path().join(name).exists(), "{name} is left");
        }
        for name in kept {
            assert!(tmp.path().join(name).exists(), "{name} was removed");
        }
    }

    #[test]
    fn a_user_id_that_begins_with_a_dot_keeps_its_history_across_restarts() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        store.save_logins(".dotted-user", &[10.0, 20.0]).unwrap();
        store.save_logins("plain-user", &[30.0]).unwrap();
        drop(store);
        let store = Store::open(tmp.path()).unwrap();
        let logins = store.load_logins().unwrap();
        assert!(logins.failed.is_empty(), "{:?}", logins.failed);
        assert_eq!(logins.get(".dotted-user"), Some(&vec![10.0, 20.0]));
        assert_eq!(logins.get("plain-user"), Some(&vec![30.0]));
    }

    #[test]
    fn many_files_load_and_none_is_lost_or_mixed_up() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        for i in 0..200 {
            let rec = SessionRecord { id: format!("s{i:03}"), username: format!("user {i}"), ..Default::default() };
            store.save_session(&rec).unwrap();
            store.save_logins(&format!("user-{i:04}"), &[i as f64]).unwrap();
        }
        // Corrupt files wherever the listing puts them.
        for i in [0, 57, 123, 199] {
            fs::write(tmp.path().join(format!("sessions/s{i:03}.json")), b"{").unwrap();
        }
        let sessions = store.load_sessions().unwrap();
        assert_eq!(sessions.len(), 196);
        for (id, rec) in sessions.iter() {
            let i: usize = id[1..].parse().unwrap();
            assert_eq!((&rec.id, rec.username.as_str()), (id, format!("user {i}").as_str()));
        }
        let mut failed: Vec<&str> = sessions.failed.iter().map(|(id, _)| id.as_str()).collect();
        failed.sort_unstable();
        assert_eq!(failed, ["s000", "s057", "s123", "s199"]);
        let logins = store.load_logins().unwrap();
        assert_eq!(logins.len(), 200);
        assert!(logins.iter().all(|(uid, l)| l == &vec![uid[5..].parse::<f64>().unwrap()]));
    }

    #[test]
    fn load_errors_are_returned_not_swallowed() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        store.save_session(&SessionRecord { id: "good".into(), ..Default::default() }).unwrap();
        fs::write(tmp.path().join("sessions/bad.json"), b"{\"token\": 5}").unwrap();
        fs::write(tmp.path().join("logins/user-0001.json"), b"nope").unwrap();
        assert!(store.load_session("missing").unwrap().is_none());
        let sessions = store.load_sessions().unwrap();
        assert_eq!(sessions.keys().collect::<Vec<_>>(), ["good"]);
        assert_eq!(sessions.failed.len(), 1);
        assert_eq!(sessions.failed[0].0, "bad");
        assert!(matches!(sessions.failed[0].1, StoreError::Corrupt { .. }), "{:?}", sessions.failed);
        let logins = store.load_logins().unwrap();
        assert!(logins.is_empty());
        assert!(matches!(logins.failed.as_slice(), [(uid, StoreError::Corrupt { .. })] if uid == "user-0001"));
        // The error names the file but never its content.
        let msg = sessions.failed[0].1.to_string();
        assert!(msg.contains("bad.json") && !msg.contains("token"), "{msg}");
        if !rustix::process::geteuid().is_root() {
            let good = tmp.path().join("sessions/good.json");
            fs::set_permissions(&good, fs::Permissions::from_mode(0o000)).unwrap();
            assert!(matches!(store.load_session("good"), Err(StoreError::Io { .. })));
            assert!(
                matches!(store.load_sessions().unwrap().failed.as_slice(), [(id, StoreError::Io { .. })] if id == "good")
            );
        }
    }

    #[test]
    fn a_value_that_cannot_be_serialized_writes_nothing() {
        struct Unserializable;
        impl Serialize for Unserializable {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("refused"))
            }
        }
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("x.json");
        fs::write(&path, b"old").unwrap();
        let e = write_json(&path, &Unserializable).unwrap_err();
        assert!(matches!(e, StoreError::Serialize { .. }), "{e}");
        assert_eq!(fs::read(&path).unwrap(), b"old", "the old file stays");
        assert_eq!(names_in(tmp.path()), ["x.json"]);
    }

    #[test]
    fn temporary_names_are_told_apart_from_state_files() {
        for t in [".a.json.tmp-1-0badcafe", "..x.json.tmp-22-00000000", ".a.tmp-b.json.tmp-3-ffffffff"] {
            assert!(is_temporary(t), "{t}");
        }
        for n in [
            ".dotted-user.json",
            ".a.json.tmp-1-0badcaf",
            ".a.json.tmp--0badcafe",
            "a.json.tmp-1-0badcafe",
            ".tmp-1-0badcafe",
            ".a.json.tmp-1-0badcafg",
        ] {
            assert!(!is_temporary(n), "{n}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Fuzzing by property: any bytes in a state file load as a record or are moved
        /// aside; nothing panics and the other files still load.
        #[test]
        fn arbitrary_state_files_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let tmp = tempfile::tempdir().unwrap();
            let store = Store::open(tmp.path()).unwrap();
            store.save_session(&SessionRecord { id: "good".into(), ..Default::default() }).unwrap();
            fs::write(tmp.path().join("sessions/fuzz.json"), &bytes).unwrap();
            fs::write(tmp.path().join("logins/user-0001.json"), &bytes).unwrap();
            fs::write(tmp.path().join("installation.json"), &bytes).unwrap();
            let loaded = store.load_sessions().unwrap();
            proptest::prop_assert!(loaded.contains_key("good"));
            let _ = store.load_logins().unwrap();
            proptest::prop_assert!(crate::authreq::is_device_id(&store.device_id().unwrap()));
        }
    }

    #[test]
    fn read_only_directory_is_an_error_not_a_panic() {
        if rustix::process::geteuid().is_root() {
            // root ignores directory permissions; the error path is covered by a missing parent.
            let e = write_atomic(Path::new("/nonexistent-dir/x.json"), b"{}").unwrap_err();
            assert!(e.to_string().contains("/nonexistent-dir"));
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        fs::set_permissions(tmp.path().join("sessions"), fs::Permissions::from_mode(0o500)).unwrap();
        let rec = SessionRecord { id: "a".into(), ..Default::default() };
        assert!(store.save_session(&rec).is_err());
    }
}
