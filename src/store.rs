//! The state on disk: the installation's device id, one file per session, and one login
//! history per `unique_user_id` (the rate budget, counted across restarts).
//!
//! Layout under the state directory (mode 0700): `installation.json`,
//! `sessions/<id>.json`, `logins/<unique_user_id>.json`, each mode 0600 and written
//! atomically (temporary file created with `create_new`, fsync, rename, fsync of the
//! directory), so a kill -9 at any moment leaves the old or the new file. A file that does
//! not parse is moved aside as `<name>.corrupt-<unix time>` (kept for inspection, never
//! deleted) and the daemon carries on without it. Functions here block; the runtime calls
//! them from `spawn_blocking`.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::secret::Secret;

/// Format version of every file written here.
pub const FORMAT_VERSION: u32 = 1;

/// A storage failure, naming the path; never a secret.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {what}: {source}")]
pub struct StoreError {
    /// The file or directory concerned.
    pub path: String,
    /// What was being done.
    pub what: &'static str,
    /// The I/O error.
    #[source]
    pub source: std::io::Error,
}

fn err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError { path: path.display().to_string(), what, source }
}

/// The profile of a session added over D-Bus (configured sessions take theirs from the
/// config file instead).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredProfile {
    /// The user.
    pub unique_user_id: String,
    /// The user's e-mail.
    pub email: String,
    /// Optional.
    #[serde(default)]
    pub first_name: Option<String>,
    /// Optional.
    #[serde(default)]
    pub last_name: Option<String>,
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

/// The state directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
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

/// Outcome of reading one JSON file.
enum Read<T> {
    Missing,
    Ok(T),
    /// It did not parse and was moved aside.
    Corrupt,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Read<T>, StoreError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Read::Missing),
        Err(e) => return Err(err(path, "cannot read")(e)),
    };
    match serde_json::from_slice::<T>(&bytes) {
        Ok(v) => Ok(Read::Ok(v)),
        Err(e) => {
            let stamp =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            let aside = PathBuf::from(format!("{}.corrupt-{stamp}", path.display()));
            fs::rename(path, &aside).map_err(err(path, "cannot move corrupt file aside"))?;
            tracing::error!(
                path = %path.display(),
                moved_to = %aside.display(),
                error = %format!("line {} column {}: {:?}", e.line(), e.column(), e.classify()),
                "state file is corrupt; moved aside and starting without it"
            );
            Ok(Read::Corrupt)
        }
    }
}

impl Store {
    /// Opens (creating with mode 0700) the state directory and its subdirectories.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        ensure_dir(dir)?;
        ensure_dir(&dir.join("sessions"))?;
        ensure_dir(&dir.join("logins"))?;
        Ok(Store { dir: dir.to_owned() })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn session_path(&self, id: &str) -> PathBuf {
        self.dir.join("sessions").join(format!("{id}.json"))
    }

    fn logins_path(&self, uid: &str) -> PathBuf {
        self.dir.join("logins").join(format!("{uid}.json"))
    }

    /// The installation's device id, made (random, 32 hex digits) and stored on first use.
    pub fn device_id(&self) -> Result<String, StoreError> {
        let path = self.dir.join("installation.json");
        if let Read::Ok(i) = read_json::<Installation>(&path)?
            && crate::authreq::is_device_id(&i.device_id)
        {
            return Ok(i.device_id);
        }
        let device_id = crate::authreq::random_hex128();
        let inst = Installation { version: FORMAT_VERSION, device_id: device_id.clone() };
        write_atomic(&path, &to_json(&inst))?;
        Ok(device_id)
    }

    /// Every stored session, by id. Corrupt files are moved aside and skipped.
    pub fn load_sessions(&self) -> Result<BTreeMap<String, SessionRecord>, StoreError> {
        let dir = self.dir.join("sessions");
        let mut out = BTreeMap::new();
        for entry in fs::read_dir(&dir).map_err(err(&dir, "cannot list"))? {
            let entry = entry.map_err(err(&dir, "cannot list"))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".json") else { continue };
            if name.starts_with('.') {
                continue;
            }
            match self.load_session(id) {
                Ok(Some(rec)) => {
                    out.insert(id.to_owned(), rec);
                }
                Ok(None) => {}
                // One unreadable file must not keep the others from loading.
                Err(e) => tracing::error!(error = %e, "cannot read a session's state; skipping it"),
            }
        }
        Ok(out)
    }

    /// One stored session, if its id is valid and its file exists and parses (a corrupt one
    /// is moved aside).
    pub fn load_session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        if crate::config::validate_session_id(id).is_err() {
            return Ok(None);
        }
        match read_json::<SessionRecord>(&self.session_path(id))? {
            Read::Ok(mut rec) => {
                rec.id = id.to_owned();
                Ok(Some(rec))
            }
            _ => Ok(None),
        }
    }

    /// Saves a session's record.
    pub fn save_session(&self, rec: &SessionRecord) -> Result<(), StoreError> {
        let mut rec = rec.clone();
        rec.version = FORMAT_VERSION;
        write_atomic(&self.session_path(&rec.id), &to_json(&rec))
    }

    /// Forgets a session's record.
    pub fn remove_session(&self, id: &str) -> Result<(), StoreError> {
        let path = self.session_path(id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(err(&path, "cannot remove")(e)),
        }
    }

    /// Every stored login history, by user.
    pub fn load_logins(&self) -> Result<BTreeMap<String, Vec<f64>>, StoreError> {
        let dir = self.dir.join("logins");
        let mut out = BTreeMap::new();
        for entry in fs::read_dir(&dir).map_err(err(&dir, "cannot list"))? {
            let entry = entry.map_err(err(&dir, "cannot list"))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(uid) = name.strip_suffix(".json") else { continue };
            if name.starts_with('.') || crate::config::validate_unique_user_id(uid).is_err() {
                continue;
            }
            match read_json::<LoginHistory>(&entry.path()) {
                Ok(Read::Ok(h)) => {
                    let logins = h.logins.into_iter().filter(|t| t.is_finite()).collect();
                    out.insert(uid.to_owned(), logins);
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "cannot read a login history; skipping it"),
            }
        }
        Ok(out)
    }

    /// Saves one user's login history.
    pub fn save_logins(&self, uid: &str, logins: &[f64]) -> Result<(), StoreError> {
        let h = LoginHistory { version: FORMAT_VERSION, unique_user_id: uid.to_owned(), logins: logins.to_vec() };
        write_atomic(&self.logins_path(uid), &to_json(&h))
    }
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing these plain structs (strings, numbers, options) cannot fail; the fallback
    // only exists so that no panic is possible here.
    serde_json::to_vec_pretty(v).unwrap_or_default()
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
        assert!(store.load_session("../default").unwrap().is_none(), "ids are checked before use as paths");
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
