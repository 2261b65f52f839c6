//! Reading a credential file the SPEC section 3 way: the app-user bearer credential that
//! signing requests carry.
//!
//! [`read`] opens the file once and checks the file it opened (not the path before opening
//! it): a regular file owned by the daemon's user, with no group or other permission bits,
//! of at most 64 KiB. The credential is the content less one trailing newline; an empty
//! content or any other control character makes it malformed. The same function serves the
//! config check at start and reload and the read before every signing request, so the two
//! cannot disagree.
//!
//! It blocks (it reads a file): callers on the runtime use `spawn_blocking`. It knows nothing
//! of sessions, the bus or the network. No error it returns holds the file's content.

use std::io::Read;
use std::path::Path;

use rustix::fs::{FileType, Mode, OFlags};

use crate::config::CredentialSource;
use crate::secret::Secret;

/// The largest credential file accepted, in bytes (64 KiB).
pub const MAX_BYTES: u64 = 64 * 1024;

/// Why a credential file cannot be used. Every message names the file (its path, or
/// `credential:NAME` with the path it resolves to) and never holds the file's content.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// `credential:NAME` without `$CREDENTIALS_DIRECTORY`.
    #[error("{0}")]
    Unresolved(String),
    /// The file cannot be opened (missing, unreadable).
    #[error("credential file {file}: cannot open: {source}")]
    Open {
        /// The file, as [`CredentialSource::describe`] and the resolved path name it.
        file: String,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// `fstat` of the opened file failed.
    #[error("credential file {file}: cannot stat: {source}")]
    Stat {
        /// The file.
        file: String,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// A directory, FIFO, socket or device.
    #[error("credential file {file} is not a regular file")]
    NotRegular {
        /// The file.
        file: String,
    },
    /// Owned by another user than the daemon's (effective) user.
    #[error("credential file {file} is owned by uid {owner}, not by the daemon's user (uid {euid})")]
    WrongOwner {
        /// The file.
        file: String,
        /// The file's owner.
        owner: u32,
        /// The daemon's effective uid.
        euid: u32,
    },
    /// Group or other permission bits are set.
    #[error(
        "credential file {file} has mode {mode:04o}; it must have no group or other permission bits (chmod 600 {path})"
    )]
    TooOpen {
        /// The file.
        file: String,
        /// The resolved path, for the `chmod` hint.
        path: String,
        /// The permission bits.
        mode: u32,
    },
    /// Larger than [`MAX_BYTES`].
    #[error("credential file {file} is larger than 64 KiB ({size} bytes)")]
    TooLarge {
        /// The file.
        file: String,
        /// Its size, or at least the bytes read.
        size: u64,
    },
    /// Reading the opened file failed.
    #[error("credential file {file}: cannot read: {source}")]
    Read {
        /// The file.
        file: String,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// Empty, or empty but for one trailing newline.
    #[error("credential file {file} is malformed: it is empty")]
    Empty {
        /// The file.
        file: String,
    },
    /// A control character other than one trailing newline, or bytes that are not UTF-8.
    #[error("credential file {file} is malformed: {reason} at byte {offset}")]
    Malformed {
        /// The file.
        file: String,
        /// What was found, in words (never the byte's neighbourhood).
        reason: &'static str,
        /// Where, counted from 0; a position says nothing of the content.
        offset: usize,
    },
}

/// Reads the credential `source` names. Blocking; see the module documentation for the rules.
pub fn read(source: &CredentialSource) -> Result<Secret, CredentialError> {
    let path = source.path().map_err(CredentialError::Unresolved)?;
    let file = match source {
        CredentialSource::File(_) => source.describe(),
        CredentialSource::SystemdCredential(_) => format!("{} ({})", source.describe(), path.display()),
    };
    read_path(&path, &file)
}

/// Reads the credential at `path`; `file` names it in errors.
fn read_path(path: &Path, file: &str) -> Result<Secret, CredentialError> {
    let named = || file.to_owned();
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer. O_NOCTTY: a
    // terminal device must not become the controlling terminal. Neither matters for the
    // regular file that passes the checks below.
    let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY;
    let fd = rustix::fs::open(path, flags, Mode::empty())
        .map_err(|e| CredentialError::Open { file: named(), source: e.into() })?;
    let st = rustix::fs::fstat(&fd).map_err(|e| CredentialError::Stat { file: named(), source: e.into() })?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(CredentialError::NotRegular { file: named() });
    }
    let euid = rustix::process::geteuid().as_raw();
    if st.st_uid != euid {
        return Err(CredentialError::WrongOwner { file: named(), owner: st.st_uid, euid });
    }
    let mode = st.st_mode & 0o7777;
    if mode & 0o077 != 0 {
        return Err(CredentialError::TooOpen { file: named(), path: path.display().to_string(), mode });
    }
    let size = u64::try_from(st.st_size).unwrap_or(0);
    if size > MAX_BYTES {
        return Err(CredentialError::TooLarge { file: named(), size });
    }
    // The file may grow between fstat and read: read one byte more than allowed to tell.
    let mut content = Vec::new();
    std::fs::File::from(fd)
        .take(MAX_BYTES + 1)
        .read_to_end(&mut content)
        .map_err(|e| CredentialError::Read { file: named(), source: e })?;
    let read = content.len() as u64;
    if read > MAX_BYTES {
        return Err(CredentialError::TooLarge { file: named(), size: read });
    }
    parse(&content).map(Secret::new).map_err(|m| m.with_file(named()))
}

/// What is wrong with a credential's bytes, before the file name is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Defect {
    Empty,
    Malformed { reason: &'static str, offset: usize },
}

impl Defect {
    fn with_file(self, file: String) -> CredentialError {
        match self {
            Defect::Empty => CredentialError::Empty { file },
            Defect::Malformed { reason, offset } => CredentialError::Malformed { file, reason, offset },
        }
    }
}

/// The credential in `content`: less one trailing `\n` or `\r\n`, not empty, UTF-8, and free
/// of control characters (U+0000-U+001F, U+007F).
fn parse(content: &[u8]) -> Result<&str, Defect> {
    let body = content.strip_suffix(b"\r\n").or_else(|| content.strip_suffix(b"\n")).unwrap_or(content);
    if body.is_empty() {
        return Err(Defect::Empty);
    }
    if let Some(offset) = body.iter().position(|b| *b < 0x20 || *b == 0x7f) {
        let reason = match body.get(offset) {
            Some(b'\n') => "a line break other than one at the end",
            Some(b'\r') => "a carriage return other than in a trailing \\r\\n",
            _ => "a control character",
        };
        return Err(Defect::Malformed { reason, offset });
    }
    std::str::from_utf8(body)
        .map_err(|e| Defect::Malformed { reason: "bytes that are not UTF-8", offset: e.valid_up_to() })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    use super::*;

    /// A private temporary directory with one credential file of `content` and `mode`.
    fn file_with(content: &[u8], mode: u32) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cred");
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        (dir, p)
    }

    fn read_file(p: &Path) -> Result<Secret, CredentialError> {
        read(&CredentialSource::File(p.to_owned()))
    }

    fn read_bytes(content: &[u8]) -> Result<Secret, CredentialError> {
        let (_dir, p) = file_with(content, 0o600);
        read_file(&p)
    }

    #[test]
    fn one_trailing_newline_is_dropped() {
        assert_eq!(read_bytes(b"abc\n").unwrap().expose(), "abc");
        assert_eq!(read_bytes(b"abc\r\n").unwrap().expose(), "abc");
        assert_eq!(read_bytes(b"abc").unwrap().expose(), "abc");
        assert_eq!(read_bytes(b" a b ").unwrap().expose(), " a b ", "spaces are content");
        assert_eq!(read_bytes("jeton-\u{e9}\u{80}".as_bytes()).unwrap().expose(), "jeton-\u{e9}\u{80}");
    }

    #[test]
    fn empty_and_control_characters_are_malformed() {
        for content in [&b""[..], b"\n", b"\r\n"] {
            assert!(matches!(read_bytes(content), Err(CredentialError::Empty { .. })), "{content:?}");
        }
        for content in
            [&b"a\nb"[..], b"abc\n\n", b"abc\r", b"abc\n\r\n", b"a\tb", b"a\x00b", b"a\x7fb", b"\x1b[0m", b"\xff\xfe"]
        {
            let e = read_bytes(content).unwrap_err();
            assert!(matches!(e, CredentialError::Malformed { .. }), "{content:?}: {e}");
            assert!(e.to_string().contains("malformed"), "{e}");
        }
    }

    #[test]
    fn size_limit_is_64_kib() {
        let max = usize::try_from(MAX_BYTES).unwrap();
        assert_eq!(read_bytes(&vec![b'x'; max]).unwrap().len(), max);
        let e = read_bytes(&vec![b'x'; max + 1]).unwrap_err();
        assert!(matches!(e, CredentialError::TooLarge { size, .. } if size == MAX_BYTES + 1), "{e}");
        assert!(e.to_string().contains("64 KiB"), "{e}");
    }

    #[test]
    fn group_or_other_bits_are_refused() {
        for mode in [0o640, 0o604, 0o660, 0o601, 0o610, 0o644] {
            let (_dir, p) = file_with(b"secret-value", mode);
            let e = read_file(&p).unwrap_err();
            assert!(matches!(e, CredentialError::TooOpen { mode: m, .. } if m == mode), "{mode:o}: {e}");
            let text = e.to_string();
            assert!(text.contains(&p.display().to_string()) && text.contains(&format!("{mode:04o}")), "{text}");
            assert!(!text.contains("secret-value"), "{text}");
        }
        for mode in [0o600, 0o400, 0o700] {
            let (_dir, p) = file_with(b"ok", mode);
            assert_eq!(read_file(&p).unwrap().expose(), "ok", "{mode:o}");
        }
    }

    #[test]
    fn missing_files_and_directories_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let e = read_file(&missing).unwrap_err();
        assert!(matches!(e, CredentialError::Open { .. }), "{e}");
        assert!(e.to_string().contains(&missing.display().to_string()), "{e}");
        let e = read_file(dir.path()).unwrap_err();
        assert!(matches!(e, CredentialError::NotRegular { .. }), "{e}");
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(rustix::fs::CWD, &fifo, FileType::Fifo, Mode::from_raw_mode(0o600), 0).unwrap();
        // Run it on a thread so that a regression fails the test instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        let p = fifo.clone();
        std::thread::spawn(move || {
            let _ = tx.send(read_file(&p).map(|_| ()).map_err(|e| e.to_string()));
        });
        let got = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("reading a FIFO must not block");
        let e = got.unwrap_err();
        assert!(e.contains("not a regular file") && e.contains(&fifo.display().to_string()), "{e}");
    }

    #[test]
    fn a_symlink_to_a_good_file_is_read_and_to_a_bad_one_refused() {
        let (dir, target) = file_with(b"abc\n", 0o600);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        // The link itself shows mode 0777; the opened file is what counts.
        assert_eq!(read_file(&link).unwrap().expose(), "abc");
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(read_file(&link), Err(CredentialError::TooOpen { .. })));
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("gone"), &dangling).unwrap();
        assert!(matches!(read_file(&dangling), Err(CredentialError::Open { .. })));
    }

    #[test]
    fn a_file_of_another_user_is_refused() {
        let euid = rustix::process::geteuid().as_raw();
        let (_dir, p) = file_with(b"abc", 0o600);
        let p = if euid == 0 {
            // Root can give the file away; 65534 is "nobody".
            std::os::unix::fs::chown(&p, Some(65534), None).unwrap();
            p
        } else {
            // A user cannot: /etc/passwd is root's (and checked for the owner before its mode).
            PathBuf::from("/etc/passwd")
        };
        let e = read_file(&p).unwrap_err();
        assert!(matches!(e, CredentialError::WrongOwner { .. }), "{e}");
        assert!(e.to_string().contains(&p.display().to_string()) && e.to_string().contains("owned by uid"), "{e}");
    }

    #[test]
    fn systemd_credentials_need_the_directory() {
        // Only the variant whose error does not depend on the environment is tested here; the
        // resolution itself is `CredentialSource::path`'s.
        let src = CredentialSource::SystemdCredential("app".into());
        match std::env::var_os("CREDENTIALS_DIRECTORY") {
            None => {
                let e = read(&src).unwrap_err();
                assert!(matches!(e, CredentialError::Unresolved(_)) && e.to_string().contains("credential:app"), "{e}");
            }
            Some(_) => {
                let e = read(&src).unwrap_err();
                assert!(e.to_string().contains("credential:app"), "{e}");
            }
        }
    }

    /// The rules written plainly, to compare [`read`] with.
    fn model(content: &[u8]) -> Option<String> {
        let body = if content.ends_with(b"\r\n") {
            &content[..content.len() - 2]
        } else if content.ends_with(b"\n") {
            &content[..content.len() - 1]
        } else {
            content
        };
        let text = std::str::from_utf8(body).ok()?;
        if text.is_empty() || text.chars().any(|c| c < ' ' || c == '\u{7f}') {
            return None;
        }
        Some(text.to_owned())
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { cases: 128, ..Default::default() })]

        /// Arbitrary content never panics, agrees with the rules, and never reaches the
        /// error message.
        #[test]
        fn arbitrary_bytes_never_panic_or_leak(
            prefix in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
            suffix in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
            marked in proptest::bool::ANY,
        ) {
            let mut content = prefix.clone();
            if marked {
                content.extend_from_slice(b"S3CRET-MARK");
            }
            content.extend_from_slice(&suffix);
            let got = read_bytes(&content);
            proptest::prop_assert_eq!(got.as_ref().ok().map(|s| s.expose().to_owned()), model(&content));
            if let Err(e) = got {
                let text = format!("{e} {e:?}");
                proptest::prop_assert!(!text.contains("S3CRET"), "{}", text);
                let shown = String::from_utf8_lossy(&content);
                let shown = shown.trim();
                if shown.chars().count() >= 6 {
                    proptest::prop_assert!(!text.contains(shown), "{}", text);
                }
            }
        }
    }
}
