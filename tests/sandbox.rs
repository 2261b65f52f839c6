//! Landlock confinement (SPEC section 8), proved in child processes: Landlock restricts a
//! process for the rest of its life, so the test runner never confines itself. Each case
//! re-executes this binary with `ENTRUPY_SANDBOX_TEST_CHILD` naming the child's role; the
//! child confines itself as the daemon would and checks what it can and cannot do, and the
//! parent checks that it exited 0.
//!
//! Without libtest (`harness = false` in `Cargo.toml`): a libtest binary runs each test on a
//! thread of its own, and the daemon confines itself while it has one thread, before its
//! runtime starts; the children here do the same. Arguments that do not begin with `-`
//! select cases by substring, as libtest's filters do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{ErrorKind, Read};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use entrupy_tokend::sandbox::{self, Enforcement, Plan};
use entrupy_tokend::store::{SessionRecord, Store};

const ROLE: &str = "ENTRUPY_SANDBOX_TEST_CHILD";
const ROOT: &str = "ENTRUPY_SANDBOX_TEST_ROOT";
const PORTS: &str = "ENTRUPY_SANDBOX_TEST_PORTS";

/// The test tree under a temporary directory `root`:
/// `home/` (the fake `$HOME`) with `secret`, `.config/entrupy-tokend/config.toml`,
/// `creds/cred` and the state directory `.local/state/entrupy-tokend/`; `outside/` (next to
/// the home) with `readable` and `link-to-secret`, a symbolic link into the home.
struct Tree {
    root: PathBuf,
}

impl Tree {
    fn create(root: &Path) -> Tree {
        let t = Tree { root: root.to_owned() };
        for d in [t.config_dir(), t.creds_dir(), t.state_dir(), t.outside()] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(t.home().join("secret"), "secret").unwrap();
        std::fs::write(t.config_dir().join("config.toml"), "# config").unwrap();
        std::fs::write(t.creds_dir().join("cred"), "credential").unwrap();
        std::fs::write(t.outside().join("readable"), "readable").unwrap();
        std::os::unix::fs::symlink(t.home().join("secret"), t.outside().join("link-to-secret")).unwrap();
        t
    }
    fn home(&self) -> PathBuf {
        self.root.join("home")
    }
    fn config_dir(&self) -> PathBuf {
        self.home().join(".config/entrupy-tokend")
    }
    fn creds_dir(&self) -> PathBuf {
        self.home().join("creds")
    }
    fn state_dir(&self) -> PathBuf {
        self.home().join(".local/state/entrupy-tokend")
    }
    fn outside(&self) -> PathBuf {
        self.root.join("outside")
    }
    fn plan(&self, tcp_ports: Vec<u16>) -> Plan {
        Plan {
            home: Some(self.home()),
            read_write: vec![self.state_dir()],
            read_only: vec![self.config_dir(), self.creds_dir(), self.home().join("no-such-dir")],
            tcp_ports,
        }
    }
}

/// Runs this binary as the child `role` and checks that it succeeded; returns its output.
fn run_child(role: &str, root: &Path, ports: &str) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .env(ROLE, role)
        .env(ROOT, root)
        .env(PORTS, ports)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child {role}: {}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    stdout
}

fn denied<T: std::fmt::Debug>(what: &str, r: std::io::Result<T>) {
    match r {
        Err(e) if e.kind() == ErrorKind::PermissionDenied => {}
        other => panic!("{what}: expected a denial, got {other:?}"),
    }
}

fn allowed<T>(what: &str, r: std::io::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// The daemon's confinement: everything the module documentation promises.
fn case_confined_process() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = Tree::create(&std::fs::canonicalize(tmp.path()).unwrap());
    let allowed_port = TcpListener::bind("127.0.0.1:0").unwrap();
    let other_port = TcpListener::bind("127.0.0.1:0").unwrap();
    let ports = format!("{},{}", allowed_port.local_addr().unwrap().port(), other_port.local_addr().unwrap().port());
    let out = run_child("confined", &tree.root, &ports);
    print!("{out}");
    // The child wrote through the store; the files are there afterwards.
    assert!(tree.state_dir().join("sessions/default.json").is_file());
    assert!(!tree.outside().join("new").exists() && !tree.config_dir().join("new").exists());
}

fn child_confined(tree: &Tree, ports: &[u16]) {
    let [allowed_port, other_port] = ports else { panic!("two ports expected: {ports:?}") };
    sandbox::make_non_dumpable().unwrap();
    assert_eq!(rustix::process::dumpable_behavior().unwrap(), rustix::process::DumpableBehavior::NotDumpable);

    let status = sandbox::confine(&tree.plan(vec![*allowed_port])).unwrap();
    println!("    child: {status}");
    if status.enforcement == Enforcement::NotEnforced {
        assert_eq!(status.abi, 0, "{status:?}");
        println!("    NOTE: this kernel does not enforce Landlock; nothing more to check");
        return;
    }
    assert!(status.all_threads, "a single-threaded process is confined as a whole: {status:?}");
    assert_eq!(status.missing, vec![tree.home().join("no-such-dir")]);

    // Nothing of the home directory outside the plan, however it is reached.
    denied("read a file in $HOME", std::fs::read(tree.home().join("secret")));
    denied("list $HOME", std::fs::read_dir(tree.home()));
    denied("read through a symbolic link", std::fs::read(tree.outside().join("link-to-secret")));
    let via_proc = Path::new("/proc/self/root").join(tree.home().strip_prefix("/").unwrap()).join("secret");
    denied("read through /proc/self/root", std::fs::read(via_proc));

    // What the plan names, and everything outside the home directory.
    assert_eq!(allowed("read the config", std::fs::read_to_string(tree.config_dir().join("config.toml"))), "# config");
    assert_eq!(allowed("read a credential", std::fs::read_to_string(tree.creds_dir().join("cred"))), "credential");
    allowed("read next to $HOME", std::fs::read(tree.outside().join("readable")));
    for f in ["/etc/hosts", "/etc/resolv.conf", "/etc/nsswitch.conf", "/etc/passwd", "/proc/self/status"] {
        if Path::new(f).exists() {
            allowed(f, std::fs::read(f));
        }
    }
    for d in ["/etc/ssl/certs", "/usr/share/ca-certificates", "/usr/lib", "/sys/class", "/dev", "/run", "/proc/self/fd"]
    {
        if Path::new(d).exists() {
            allowed(d, std::fs::read_dir(d));
        }
    }
    // Name resolution through the C library (nsswitch, hosts, its modules) and the trust
    // store, as the HTTP client uses them.
    let resolved = allowed("resolve localhost", std::net::ToSocketAddrs::to_socket_addrs(&("localhost", 80)));
    assert!(resolved.count() > 0);
    let bundle = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if bundle.exists() {
        assert!(allowed("read the CA bundle", std::fs::read_to_string(bundle)).contains("BEGIN CERTIFICATE"));
    }
    let mut random = [0u8; 16];
    allowed("/dev/urandom", std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut random)));
    allowed("write /dev/null", std::fs::write("/dev/null", b"x"));

    // Writes only in the state directory, through the store as the daemon makes them.
    let store = allowed("open the store", Store::open(&tree.state_dir()).map_err(std::io::Error::other));
    let rec = SessionRecord { id: "default".into(), unique_user_id: "user-0001".into(), ..Default::default() };
    store.save_session(&rec).unwrap();
    assert_eq!(store.load_session("default").unwrap().unwrap().unique_user_id, "user-0001");
    store.save_logins(".dotted-user", &[1.0]).unwrap();
    assert_eq!(store.load_logins().unwrap()[".dotted-user"], vec![1.0]);
    denied("write next to $HOME", std::fs::write(tree.outside().join("new"), b"x"));
    denied("write the config directory", std::fs::write(tree.config_dir().join("new"), b"x"));
    denied("write $HOME", std::fs::write(tree.home().join("new"), b"x"));
    denied("write /tmp", std::fs::write(std::env::temp_dir().join("entrupy-sandbox-test"), b"x"));
    // Landlock answers EXDEV rather than EACCES to some renames across its rules.
    match std::fs::rename(tree.state_dir().join("sessions/default.json"), tree.outside().join("stolen")) {
        Err(e) if matches!(e.kind(), ErrorKind::PermissionDenied | ErrorKind::CrossesDevices) => {}
        other => panic!("move a state file out: expected a denial, got {other:?}"),
    }
    denied("execute a program", Command::new("/bin/true").status());

    // TCP: connect to the plan's ports only, bind none.
    if status.tcp_restricted {
        allowed("connect to an allowed port", TcpStream::connect(("127.0.0.1", *allowed_port)));
        denied("connect to another port", TcpStream::connect(("127.0.0.1", *other_port)));
        denied("listen on a port", TcpListener::bind("127.0.0.1:0"));
    } else {
        println!("    NOTE: Landlock ABI {} < 4: TCP is not restricted; port checks skipped", status.abi);
    }

    // Signals reach no process outside the sandbox (ABI 6 and later).
    if status.abi >= 6 {
        let parent = rustix::process::getppid().unwrap();
        assert_eq!(rustix::process::test_kill_process(parent), Err(rustix::io::Errno::PERM));
    }
}

/// Confinement in a process that already has another thread: only ABI 8 and later reach
/// it; before, it stays unconfined, and the status says so.
fn case_threads_started_before() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = Tree::create(&std::fs::canonicalize(tmp.path()).unwrap());
    print!("{}", run_child("threads", &tree.root, ""));
}

fn child_threads(tree: &Tree) {
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let secret = tree.home().join("secret");
    let earlier = {
        let secret = secret.clone();
        std::thread::spawn(move || {
            wait.recv().unwrap();
            std::fs::read(secret).is_ok()
        })
    };
    let status = sandbox::confine(&tree.plan(Vec::new())).unwrap();
    println!("    child with two threads: {status}");
    if status.enforcement == Enforcement::NotEnforced {
        println!("    NOTE: this kernel does not enforce Landlock; nothing more to check");
        return;
    }
    denied("the confining thread", std::fs::read(&secret));
    let later = std::thread::spawn({
        let secret = secret.clone();
        move || std::fs::read(secret).is_ok()
    });
    assert!(!later.join().unwrap(), "a thread started after confine is confined");
    go.send(()).unwrap();
    let earlier_could_read = earlier.join().unwrap();
    if status.abi >= 8 {
        assert!(status.all_threads && !earlier_could_read, "{status:?}");
    } else {
        assert!(!status.all_threads && status.enforcement == Enforcement::Partial, "{status:?}");
        assert!(earlier_could_read, "before ABI 8 a thread that existed stays unconfined");
    }
}

fn child(role: &str) {
    let tree = Tree { root: PathBuf::from(std::env::var_os(ROOT).unwrap()) };
    let ports: Vec<u16> =
        std::env::var(PORTS).unwrap().split(',').filter(|p| !p.is_empty()).map(|p| p.parse().unwrap()).collect();
    match role {
        "confined" => child_confined(&tree, &ports),
        "threads" => child_threads(&tree),
        other => panic!("unknown child role {other}"),
    }
}

const CASES: [(&str, fn()); 2] =
    [("confined_process", case_confined_process), ("threads_started_before", case_threads_started_before)];

fn main() -> ExitCode {
    if let Ok(role) = std::env::var(ROLE) {
        child(&role);
        return ExitCode::SUCCESS;
    }
    let mut filters = Vec::new();
    let mut args = std::env::args().skip(1);
    let (mut list, mut ignored_only) = (false, false);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--list" => list = true,
            "--ignored" => ignored_only = true,
            // libtest options that take a value as the next argument.
            "--skip" | "--test-threads" | "--format" | "--color" | "--logfile" | "-Z" => {
                args.next();
            }
            _ if a.starts_with('-') => {}
            _ => filters.push(a),
        }
    }
    let selected: Vec<_> = CASES
        .iter()
        .filter(|(name, _)| !ignored_only && (filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()))))
        .collect();
    if list {
        for (name, _) in &selected {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    println!("\nrunning {} tests", selected.len());
    let (mut passed, mut failed) = (0, 0);
    for (name, case) in selected {
        println!("test {name} ...");
        match std::panic::catch_unwind(case) {
            Ok(()) => {
                println!("test {name} ... ok");
                passed += 1;
            }
            Err(_) => {
                println!("test {name} ... FAILED");
                failed += 1;
            }
        }
    }
    println!("\ntest result: {}. {passed} passed; {failed} failed", if failed == 0 { "ok" } else { "FAILED" });
    if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
