//! Self-confinement with Landlock (SPEC section 8), and the non-dumpable flag (section 5).
//!
//! A [`Plan`] says what the daemon needs: its state directory read-write; its config
//! directory, the directories of its credential files and `$CREDENTIALS_DIRECTORY`
//! read-only; the TCP ports of its peers. [`confine`] turns it into a Landlock ruleset in
//! the crate's best-effort mode and restricts the process with it, for good: everything
//! outside the user's home directory stays readable (the system files the process needs:
//! libraries, `/etc` for DNS and TLS trust stores, `/proc`, `/sys`, `/dev`, `/run`), nothing
//! under the home directory is, except the plan's directories; writes go only to the
//! read-write directories (and `/dev/null`); no file can be executed; on ABI 4 and later TCP
//! connects only to the plan's ports (and 53, for DNS over TCP) and binds to none; on ABI 6
//! and later no signal reaches a process outside the sandbox. [`readable_paths`] computes
//! the read side without touching Landlock, so that it can be tested.
//!
//! Landlock restricts the calling thread and the threads it starts afterwards; only ABI 8
//! and later can restrict the other threads of the process at once. So the daemon calls
//! [`confine`] while it has one thread (first thing in its run, on the current-thread
//! runtime, before anything is spawned); [`Status::all_threads`] says whether every thread
//! is covered.
//!
//! Not handled on purpose: connecting to Unix sockets by path (ABI 9), since the session
//! bus, the system bus, journald and systemd's notify socket are all reached that way and
//! the kernels at hand (ABI 7) cannot test it; abstract Unix sockets (ABI 6 scope), which a
//! session bus may use; UDP (ABI 10), which DNS uses. This module knows nothing of the
//! config, the bus or the runtime: the caller builds the plan and logs the status.

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, LandlockStatus, NetPort, PathBeneath,
    RestrictSelfAttr, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope,
};
use rustix::fs::{FileType, Mode, OFlags};

/// DNS falls back to TCP for answers too long for UDP, so port 53 is always allowed.
pub const DNS_TCP_PORT: u16 = 53;

/// What the confined daemon needs. Paths should be absolute; [`confine`] resolves symbolic
/// links in them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The user's home directory (`$HOME`): nothing under it stays readable except the
    /// directories below. `None` (or `/`) hides nothing.
    pub home: Option<PathBuf>,
    /// Read-write, with everything under them: the state directory.
    pub read_write: Vec<PathBuf>,
    /// Read-only, with everything under them: the config file's directory, the directories
    /// of the credential files (a file replaced by rename stays readable), and
    /// `$CREDENTIALS_DIRECTORY` when set.
    pub read_only: Vec<PathBuf>,
    /// TCP ports the daemon may connect to (ABI 4 and later): those of the configured URLs
    /// and of a configured proxy. [`DNS_TCP_PORT`] is added.
    pub tcp_ports: Vec<u16>,
}

impl Plan {
    /// `$HOME`, if it is set, absolute and not `/`.
    pub fn home_from_env() -> Option<PathBuf> {
        let home = PathBuf::from(std::env::var_os("HOME")?);
        (home.is_absolute() && home != Path::new("/")).then_some(home)
    }
}

/// How much of the plan the kernel enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforcement {
    /// All of it.
    Full,
    /// Part of it: the kernel lacks some of the Landlock features asked for (TCP ports before
    /// ABI 4, signal scoping before ABI 6, restricting the other threads before ABI 8, ...).
    Partial,
    /// Nothing: the kernel has no Landlock, or it is disabled, or a seccomp filter blocks its
    /// system calls. The process runs unconfined.
    NotEnforced,
}

/// The outcome of [`confine`], for one log line and for checking a reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The Landlock ABI version of the running kernel, 0 when Landlock is not available.
    pub abi: u32,
    /// How much of the plan is enforced.
    pub enforcement: Enforcement,
    /// Whether every thread of the process is confined: it had one thread when `confine`
    /// ran, or the kernel (ABI 8 and later) confined all its threads at once. When false,
    /// only the calling thread and the threads it starts later are.
    pub all_threads: bool,
    /// Whether TCP connections are limited to the plan's ports (ABI 4 and later).
    pub tcp_restricted: bool,
    /// Paths of the plan that did not exist, so got no rule (and stay inaccessible if they
    /// are under the home directory).
    pub missing: Vec<PathBuf>,
    /// Why nothing is enforced, when it is not.
    pub reason: Option<&'static str>,
    applied: Applied,
}

/// What the ruleset allows, to tell whether a later plan fits in it.
#[derive(Clone, Default, PartialEq, Eq)]
struct Applied {
    read: Vec<PathBuf>,
    write: Vec<PathBuf>,
    tcp_ports: BTreeSet<u16>,
}

impl fmt::Debug for Applied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Applied")
            .field("read", &format_args!("{} paths", self.read.len()))
            .field("write", &self.write)
            .field("tcp_ports", &self.tcp_ports)
            .finish()
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.enforcement {
            Enforcement::NotEnforced => {
                write!(f, "not confined: {}", self.reason.unwrap_or("Landlock is not available"))
            }
            e => {
                let how = if e == Enforcement::Full { "fully" } else { "partly" };
                write!(f, "confined with Landlock ABI {} ({how} enforced", self.abi)?;
                if !self.tcp_restricted {
                    write!(f, "; TCP not restricted")?;
                }
                if !self.all_threads {
                    write!(f, "; other threads of the process not confined")?;
                }
                write!(f, ")")
            }
        }
    }
}

/// Something a new plan needs that the confinement in force does not allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uncovered {
    /// A directory to read.
    Read(PathBuf),
    /// A directory to write.
    Write(PathBuf),
    /// A TCP port to connect to.
    TcpPort(u16),
}

impl fmt::Display for Uncovered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Uncovered::Read(p) => write!(f, "read access to {}", p.display()),
            Uncovered::Write(p) => write!(f, "write access to {}", p.display()),
            Uncovered::TcpPort(p) => write!(f, "TCP port {p}"),
        }
    }
}

impl Status {
    /// What `plan` needs beyond what this confinement allows: empty when a reload to it can
    /// go ahead; otherwise the daemon keeps its old config and says a restart is needed.
    /// Nothing is beyond a confinement that is not enforced.
    pub fn uncovered(&self, plan: &Plan) -> Vec<Uncovered> {
        if self.enforcement == Enforcement::NotEnforced {
            return Vec::new();
        }
        let beneath = |roots: &[PathBuf], p: &Path| roots.iter().any(|r| p.starts_with(r));
        let mut out = Vec::new();
        for p in &plan.read_write {
            let p = resolved(p);
            if !beneath(&self.applied.write, &p) {
                out.push(Uncovered::Write(p));
            }
        }
        for p in &plan.read_only {
            let p = resolved(p);
            if !beneath(&self.applied.read, &p) && !beneath(&self.applied.write, &p) {
                out.push(Uncovered::Read(p));
            }
        }
        if self.tcp_restricted {
            let wanted: BTreeSet<u16> = plan.tcp_ports.iter().copied().collect();
            out.extend(wanted.difference(&self.applied.tcp_ports).map(|&p| Uncovered::TcpPort(p)));
        }
        out
    }
}

/// A failure to build or apply the ruleset. The process is not confined after one.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A path of the plan could not be opened for a rule.
    #[error("{path}: cannot open for the Landlock ruleset: {source}")]
    Path {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Landlock refused the ruleset or the restriction.
    #[error("Landlock: {0}")]
    Landlock(#[from] landlock::RulesetError),
}

/// The newest Landlock ABI whose file-system rights this module handles (tested on ABI 7).
/// Newer rights are left alone until they are tested: see the module documentation.
const FS_ABI: ABI = ABI::V5;

/// Rights to read a directory tree (no execution).
fn read_rights() -> BitFlags<AccessFs> {
    AccessFs::ReadFile | AccessFs::ReadDir
}

/// Rights to read and change a directory tree: what the store's atomic writes, moved-aside
/// copies and removals need, and no more (no devices, sockets, pipes, links or execution).
fn write_rights() -> BitFlags<AccessFs> {
    read_rights()
        | AccessFs::WriteFile
        | AccessFs::Truncate
        | AccessFs::MakeReg
        | AccessFs::MakeDir
        | AccessFs::RemoveFile
        | AccessFs::Refer
}

/// The readable paths of a plan: every entry of every directory from `/` down to the home
/// directory, except the step towards it (for `/home/ada`: `/bin`, `/etc`, `/usr`, ...,
/// `/home/<every other entry>`, but not `/home/ada`, `/home` or `/`), then the plan's
/// read-only and read-write directories. Symbolic links among those entries are left out
/// (their targets are covered, or not, where they are). A directory on the way that cannot
/// be listed contributes nothing. Without a home directory, `/`.
///
/// The home directory should be absolute and without symbolic links (as `confine` passes
/// it); entries created later in those directories are not covered.
pub fn readable_paths(plan: &Plan) -> Vec<PathBuf> {
    let mut out = Vec::new();
    match plan.home.as_deref().filter(|h| h.is_absolute() && *h != Path::new("/")) {
        None => out.push(PathBuf::from("/")),
        Some(home) => {
            let mut dir = PathBuf::from("/");
            for step in home.components().filter_map(|c| match c {
                Component::Normal(s) => Some(s),
                _ => None,
            }) {
                if let Ok(entries) = std::fs::read_dir(&dir) {
                    for entry in entries.flatten() {
                        let name = entry.file_name();
                        if name == step || entry.file_type().is_ok_and(|t| t.is_symlink()) {
                            continue;
                        }
                        out.push(dir.join(name));
                    }
                }
                dir.push(step);
            }
        }
    }
    out.extend(plan.read_only.iter().cloned());
    out.extend(plan.read_write.iter().cloned());
    out.sort();
    out.dedup();
    out
}

/// A path with its symbolic links resolved, or as it is when that fails.
fn resolved(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned())
}

/// Opens `path` for a rule without following a final symbolic link; `None` when it is
/// missing or is a symbolic link.
fn open_for_rule(path: &Path) -> Result<Option<(OwnedFd, bool)>, SandboxError> {
    let fail = |e: rustix::io::Errno| SandboxError::Path { path: path.to_owned(), source: e.into() };
    let fd = match rustix::fs::open(path, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => return Err(fail(e)),
    };
    let kind = FileType::from_raw_mode(rustix::fs::fstat(&fd).map_err(fail)?.st_mode);
    match kind {
        FileType::Symlink => Ok(None),
        k => Ok(Some((fd, k == FileType::Directory))),
    }
}

/// The number of threads of this process (2 when it cannot be read: assume the worst).
fn thread_count() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Threads:").and_then(|n| n.trim().parse().ok())))
        .unwrap_or(2)
}

fn abi_number(abi: ABI) -> u32 {
    // `ABI` prints its number (or "unsupported").
    abi.to_string().parse().unwrap_or(0)
}

/// Confines the process for the rest of its life as `plan` says (see the module
/// documentation), in Landlock's best-effort mode: what the kernel cannot enforce is left
/// out and reported in the [`Status`]. On a kernel without Landlock, `Ok` with
/// [`Enforcement::NotEnforced`]; the caller logs one line at info level. Sets
/// `no_new_privs` too, as Landlock requires of an unprivileged process.
///
/// Call it before starting other threads (the async runtime): threads that exist already
/// stay unconfined on kernels before ABI 8. Paths of the plan that do not exist get no
/// rule ([`Status::missing`]).
pub fn confine(plan: &Plan) -> Result<Status, SandboxError> {
    let mut missing = Vec::new();
    let mut existing = |dirs: &[PathBuf]| -> Vec<PathBuf> {
        let mut out = Vec::new();
        for d in dirs {
            match std::fs::canonicalize(d) {
                Ok(p) => out.push(p),
                Err(_) => missing.push(d.clone()),
            }
        }
        out
    };
    let resolved_plan = Plan {
        home: plan.home.as_deref().map(resolved),
        read_write: existing(&plan.read_write),
        read_only: existing(&plan.read_only),
        tcp_ports: plan.tcp_ports.clone(),
    };
    let mut tcp_ports: BTreeSet<u16> = plan.tcp_ports.iter().copied().collect();
    tcp_ports.insert(DNS_TCP_PORT);
    let single_thread = thread_count() == 1;

    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(FS_ABI))?
        .handle_access(AccessNet::ConnectTcp | AccessNet::BindTcp)?
        .scope(Scope::Signal)?
        .create()?;
    if !single_thread {
        ruleset = ruleset.all_threads(true)?;
    }

    let mut applied = Applied { tcp_ports: tcp_ports.clone(), ..Default::default() };
    let file_rights = AccessFs::from_file(FS_ABI);
    let writable: BTreeSet<&PathBuf> = resolved_plan.read_write.iter().collect();
    for path in readable_paths(&resolved_plan) {
        if writable.contains(&path) {
            continue;
        }
        let Some((fd, is_dir)) = open_for_rule(&path)? else { continue };
        let rights = if is_dir { read_rights() } else { read_rights() & file_rights };
        ruleset = ruleset.add_rule(PathBeneath::new(fd, rights))?;
        applied.read.push(path);
    }
    for path in &resolved_plan.read_write {
        let Some((fd, is_dir)) = open_for_rule(path)? else { continue };
        let rights = if is_dir { write_rights() } else { write_rights() & file_rights };
        ruleset = ruleset.add_rule(PathBeneath::new(fd, rights))?;
        applied.write.push(path.clone());
    }
    // Some libraries open /dev/null for writing; it swallows everything.
    if let Some((fd, false)) = open_for_rule(Path::new("/dev/null"))? {
        ruleset = ruleset.add_rule(PathBeneath::new(fd, AccessFs::WriteFile | AccessFs::Truncate))?;
    }
    for &port in &tcp_ports {
        ruleset = ruleset.add_rule(NetPort::new(port, AccessNet::ConnectTcp))?;
    }

    let restricted = ruleset.restrict_self()?;
    let (abi, reason) = kernel_abi(&restricted.landlock);
    let enforcement = match restricted.ruleset {
        RulesetStatus::FullyEnforced => Enforcement::Full,
        RulesetStatus::PartiallyEnforced => Enforcement::Partial,
        RulesetStatus::NotEnforced => Enforcement::NotEnforced,
    };
    let enforced = enforcement != Enforcement::NotEnforced;
    Ok(Status {
        abi,
        enforcement,
        all_threads: enforced && (single_thread || restricted.all_threads),
        tcp_restricted: enforced && abi >= 4,
        missing,
        reason: if enforced { None } else { reason.or(Some("Landlock could not enforce any of the rules")) },
        applied: if enforced { applied } else { Applied::default() },
    })
}

/// The kernel's Landlock ABI, or why there is none.
fn kernel_abi(status: &LandlockStatus) -> (u32, Option<&'static str>) {
    match *status {
        LandlockStatus::Available { effective_abi, kernel_abi } => {
            (kernel_abi.and_then(|v| u32::try_from(v).ok()).unwrap_or_else(|| abi_number(effective_abi)), None)
        }
        LandlockStatus::NotEnabled => (0, Some("Landlock is built into the kernel but not enabled at boot")),
        LandlockStatus::NotImplemented => (
            0,
            Some(
                "the kernel has no Landlock, or a seccomp filter (systemd's SystemCallFilter=) blocks its system calls",
            ),
        ),
    }
}

/// Marks the process non-dumpable (`prctl(PR_SET_DUMPABLE, 0)`): no core file holds a token,
/// and other processes of the user cannot attach to it with ptrace or read its memory
/// through `/proc`.
pub fn make_non_dumpable() -> io::Result<()> {
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::fs;

    /// `<tmp>/a/b/home` with siblings at each level, a symbolic link, and directories inside
    /// the home that the plan adds back.
    #[test]
    fn readable_paths_leave_out_the_home_and_its_ancestors() {
        let tmp = tempfile::tempdir().unwrap();
        let root = fs::canonicalize(tmp.path()).unwrap();
        let home = root.join("a/b/home");
        for d in ["a/sib-a", "a/b/other-user", "a/b/home/.config/entrupy-tokend", "a/b/home/.local/state/x"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::write(root.join("a/b/file"), b"x").unwrap();
        fs::write(root.join("a/b/home/secret"), b"x").unwrap();
        std::os::unix::fs::symlink(&home, root.join("a/b/link-to-home")).unwrap();
        let plan = Plan {
            home: Some(home.clone()),
            read_write: vec![home.join(".local/state/x")],
            read_only: vec![home.join(".config/entrupy-tokend")],
            tcp_ports: vec![443],
        };
        let paths = readable_paths(&plan);
        for want in [
            root.join("a/sib-a"),
            root.join("a/b/other-user"),
            root.join("a/b/file"),
            home.join(".config/entrupy-tokend"),
            home.join(".local/state/x"),
            PathBuf::from("/etc"),
            PathBuf::from("/proc"),
        ] {
            assert!(paths.contains(&want), "{} missing from {paths:?}", want.display());
        }
        for p in &paths {
            assert!(!home.starts_with(p), "{} would expose the home directory", p.display());
            assert_ne!(p, &root.join("a/b/link-to-home"), "symbolic links are left out");
            if p.starts_with(&home) {
                assert!(plan.read_only.contains(p) || plan.read_write.contains(p), "{}", p.display());
            }
        }
        let mut sorted = paths.clone();
        sorted.dedup();
        assert_eq!(sorted, paths, "sorted, no duplicates");
    }

    #[test]
    fn without_a_home_everything_is_readable() {
        for home in [None, Some(PathBuf::from("/")), Some(PathBuf::from("relative/home"))] {
            let plan = Plan { home, ..Default::default() };
            assert_eq!(readable_paths(&plan), vec![PathBuf::from("/")]);
        }
    }

    #[test]
    fn uncovered_names_what_a_new_plan_needs() {
        let status = Status {
            abi: 7,
            enforcement: Enforcement::Full,
            all_threads: true,
            tcp_restricted: true,
            missing: Vec::new(),
            reason: None,
            applied: Applied {
                read: vec![PathBuf::from("/nonexistent-etc"), PathBuf::from("/nonexistent-home/ada/.config/t")],
                write: vec![PathBuf::from("/nonexistent-home/ada/.local/state/t")],
                tcp_ports: [53, 443].into_iter().collect(),
            },
        };
        let same = Plan {
            home: Some(PathBuf::from("/nonexistent-home/ada")),
            read_write: vec![PathBuf::from("/nonexistent-home/ada/.local/state/t")],
            read_only: vec![
                PathBuf::from("/nonexistent-home/ada/.config/t"),
                PathBuf::from("/nonexistent-etc/creds"),
                PathBuf::from("/nonexistent-home/ada/.local/state/t/sub"),
            ],
            tcp_ports: vec![443],
        };
        assert!(status.uncovered(&same).is_empty(), "{:?}", status.uncovered(&same));
        let more = Plan {
            read_write: vec![PathBuf::from("/nonexistent-home/ada/.config/t")],
            read_only: vec![PathBuf::from("/nonexistent-home/ada/creds")],
            tcp_ports: vec![443, 8443],
            ..same.clone()
        };
        assert_eq!(
            status.uncovered(&more),
            vec![
                Uncovered::Write(PathBuf::from("/nonexistent-home/ada/.config/t")),
                Uncovered::Read(PathBuf::from("/nonexistent-home/ada/creds")),
                Uncovered::TcpPort(8443),
            ]
        );
        assert_eq!(Uncovered::TcpPort(8443).to_string(), "TCP port 8443");
        let off = Status { enforcement: Enforcement::NotEnforced, ..status.clone() };
        assert!(off.uncovered(&more).is_empty(), "nothing is beyond no confinement");
        let no_tcp = Status { tcp_restricted: false, ..status };
        assert_eq!(no_tcp.uncovered(&more).len(), 2, "ports do not matter before ABI 4");
    }

    #[test]
    fn status_lines() {
        let status = Status {
            abi: 7,
            enforcement: Enforcement::Full,
            all_threads: true,
            tcp_restricted: true,
            missing: Vec::new(),
            reason: None,
            applied: Applied::default(),
        };
        assert_eq!(status.to_string(), "confined with Landlock ABI 7 (fully enforced)");
        let partly = Status { abi: 3, enforcement: Enforcement::Partial, tcp_restricted: false, ..status.clone() };
        assert_eq!(partly.to_string(), "confined with Landlock ABI 3 (partly enforced; TCP not restricted)");
        let off = Status {
            abi: 0,
            enforcement: Enforcement::NotEnforced,
            reason: Some("the kernel has no Landlock"),
            ..status
        };
        assert_eq!(off.to_string(), "not confined: the kernel has no Landlock");
    }
}
