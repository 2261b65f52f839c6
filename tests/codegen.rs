//! `data/com.entrupy.TokenDaemon1.xml` as input to the code generators of common toolkits,
//! and the generated code against a live daemon:
//!
//! - `gdbus-codegen` (GLib): a small C client (`tests/codegen/client.c`) is compiled against
//!   the generated code and run. It calls `IsAuthorizationValid`, `EnsureValid` (two
//!   out-arguments), reads `State` and `ExpiresAt`, calls `Refresh` and receives
//!   `LoginSucceeded`, and reads a daemon error by name and through a registered error domain.
//! - `qdbusxml2cpp` (Qt 5 and Qt 6, each where installed): the generated proxies are compiled
//!   with g++ into `tests/codegen/qt_client.cpp`, which calls `EnsureValid` and `AddSession`
//!   (`a{sv}` as `QVariantMap`) on the daemon. The adaptors are generated and compiled too.
//!
//! A test whose tools are absent prints `SKIPPED` and why; `.ci/run` installs them. When a
//! tool is there, the test compiles and runs for real.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(unused_imports)] // the harness re-exports more than this test uses
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use entrupy_tokend::names;
use zbus_xml::{ArgDirection, Node};

const XML_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/com.entrupy.TokenDaemon1.xml");
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/codegen");
const QT_TYPE_NAME: &str = "org.qtproject.QtDBus.QtTypeName";

/// Whether `program args` runs and exits 0.
fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// Runs `cmd` and fails the test, with its output, unless it exits 0.
fn check(cmd: &mut Command, what: &str) -> Output {
    let o = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{what} failed ({}):\n{}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// `pkg-config --cflags --libs MODULES`, split into words; `None` when a module is missing.
fn pkg_config(modules: &[&str]) -> Option<Vec<String>> {
    let o = Command::new("pkg-config").arg("--cflags").arg("--libs").args(modules).output().ok()?;
    o.status.success().then(|| String::from_utf8_lossy(&o.stdout).split_whitespace().map(str::to_owned).collect())
}

fn pkg_config_var(module: &str, var: &str) -> Option<PathBuf> {
    let o = Command::new("pkg-config").arg(format!("--variable={var}")).arg(module).output().ok()?;
    let v = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    (o.status.success() && !v.is_empty()).then(|| PathBuf::from(v))
}

/// A daemon whose `default` session is valid, with tokens that live an hour.
async fn env_with_valid_session() -> (Env, Daemon) {
    let env = Env::with_lifetime(Duration::from_secs(3600)).await;
    env.write_config(&Cfg { margin: "60s", ..Default::default() });
    let d = env.start_daemon().await;
    wait_state(&env, "default", "valid").await;
    (env, d)
}

/// Runs a built client against the env's bus, off the runtime's threads (the simulator runs
/// on them), and returns its stdout; fails the test unless it exits 0.
async fn run_client(env: &Env, exe: &Path, path: &str) -> String {
    let mut cmd = Command::new(exe);
    cmd.arg(path)
        .env("DBUS_SESSION_BUS_ADDRESS", &env.bus.address)
        .env("QT_QPA_PLATFORM", "offscreen")
        .stdin(Stdio::null());
    let what = exe.display().to_string();
    let o = tokio::task::spawn_blocking(move || check(&mut cmd, &what)).await.unwrap();
    String::from_utf8(o.stdout).unwrap()
}

fn line<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no line {prefix:?} in:\n{out}"))
}

/// Generates the GDBus code into `dir` and compiles `tests/codegen/client.c` against it.
/// `None` (with a message) when gdbus-codegen, a C compiler or gio's headers are missing.
fn build_gdbus_client(dir: &Path) -> Option<PathBuf> {
    if !runs("gdbus-codegen", &["--help"]) {
        println!("SKIPPED: gdbus-codegen is not installed (apt-get install libglib2.0-dev-bin)");
        return None;
    }
    let Some(flags) = pkg_config(&["gio-2.0", "gio-unix-2.0"]) else {
        println!("SKIPPED: pkg-config finds no gio-2.0 (apt-get install pkg-config libglib2.0-dev)");
        return None;
    };
    if !runs("cc", &["--version"]) {
        println!("SKIPPED: no C compiler (apt-get install gcc)");
        return None;
    }
    check(
        Command::new("gdbus-codegen")
            .current_dir(dir)
            .args(["--interface-prefix", "com.entrupy.TokenDaemon1.", "--c-namespace", "Entrupy"])
            .args(["--generate-c-code", "entrupy-tokend-dbus"])
            .arg(XML_FILE),
        "gdbus-codegen",
    );
    let exe = dir.join("client");
    // Wrong argument counts or pointer types (say, one out-argument where there are two)
    // are errors, not warnings.
    check(
        Command::new("cc")
            .current_dir(dir)
            .args(["-Wall", "-Werror=implicit-function-declaration", "-Werror=incompatible-pointer-types"])
            .args(["-Werror=int-conversion", "-o"])
            .arg(&exe)
            .arg(Path::new(FIXTURES).join("client.c"))
            .arg("entrupy-tokend-dbus.c")
            .arg(format!("-I{}", dir.display()))
            .args(&flags),
        "compiling the GDBus client",
    );
    Some(exe)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_c_client_generated_by_gdbus_codegen_talks_to_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let Some(exe) = build_gdbus_client(dir.path()) else { return };
    let (env, d) = env_with_valid_session().await;
    let s = env.session("default").await;
    let (token, exp) = s.get_token().await.unwrap();

    let out = run_client(&env, &exe, &names::session_path("default")).await;
    assert_eq!(line(&out, "IsAuthorizationValid:"), "IsAuthorizationValid: true");
    // EnsureValid(0) with a valid token returns it as it is, with its expiry.
    assert_eq!(line(&out, "EnsureValid:"), format!("EnsureValid: token of {} bytes, expires_at {exp}", token.len()));
    assert_eq!(line(&out, "State:"), "State: valid");
    assert_eq!(line(&out, "ExpiresAt:"), format!("ExpiresAt: {exp}"));
    let refreshed: u64 = line(&out, "Refresh: expires_at ").trim_start_matches("Refresh: expires_at ").parse().unwrap();
    assert!(refreshed >= exp, "Refresh returned {refreshed}, before the old expiry {exp}");
    assert_eq!(line(&out, "LoginSucceeded:"), format!("LoginSucceeded: expires_at {refreshed}"));
    assert_eq!(
        line(&out, "GetToken after Cleanup:"),
        "GetToken after Cleanup: com.entrupy.TokenDaemon1.Error.NotAuthorized, in the registered domain: NotAuthorized"
    );
    assert!(out.ends_with("done\n"), "{out}");
    assert!(!out.contains(&token), "the client printed the token");
    assert_eq!(
        s.state().await.unwrap(),
        "logged-out",
        "the client's Cleanup reached the daemon; log:\n{}",
        d.log.text()
    );
    assert_eq!(env.sim.counters().login_ok, 2, "the first login and the client's Refresh");
}

/// One Qt installation: where its generator and moc are, and the pkg-config module to
/// compile against (`None`: the tools are there, the development files are not).
struct Qt {
    name: &'static str,
    xml2cpp: PathBuf,
    moc: Option<PathBuf>,
    module: Option<&'static str>,
}

/// The Qt installations found: their bin directories from pkg-config when the development
/// files are installed, else Debian's usual places of the tools.
fn qt_installations() -> Vec<Qt> {
    let mut out = Vec::new();
    for (name, module, bin_var, moc_var, fallback) in [
        ("Qt 5", "Qt5DBus", ("Qt5Core", "host_bins"), ("Qt5Core", "host_bins"), "/usr/lib/qt5/bin"),
        ("Qt 6", "Qt6DBus", ("Qt6Core", "bindir"), ("Qt6Core", "libexecdir"), "/usr/lib/qt6/bin"),
    ] {
        let bin = pkg_config_var(bin_var.0, bin_var.1).unwrap_or_else(|| PathBuf::from(fallback));
        let xml2cpp = bin.join("qdbusxml2cpp");
        if !xml2cpp.exists() {
            continue;
        }
        let moc = pkg_config_var(moc_var.0, moc_var.1).map(|d| d.join("moc")).filter(|m| m.exists());
        let module = (pkg_config(&[module]).is_some() && moc.is_some()).then_some(module);
        out.push(Qt { name, xml2cpp, moc, module });
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qt_proxies_generated_by_qdbusxml2cpp_compile_and_talk_to_the_daemon() {
    let qts = qt_installations();
    if qts.is_empty() {
        println!(
            "SKIPPED: no qdbusxml2cpp (apt-get install qtbase5-dev or qt6-base-dev; the -dev-tools packages alone only generate)"
        );
        return;
    }
    let mut compiled = 0;
    for qt in &qts {
        let dir = tempfile::tempdir().unwrap();
        // The generator refuses a type it cannot map (a{sv} without a QtTypeName annotation).
        check(
            Command::new(&qt.xml2cpp)
                .current_dir(dir.path())
                .args(["-p", "entrupy_proxy", "-a", "entrupy_adaptor"])
                .arg(XML_FILE),
            &format!("{} qdbusxml2cpp", qt.name),
        );
        let (Some(module), Some(moc)) = (qt.module, &qt.moc) else {
            println!("{}: qdbusxml2cpp accepts the file; not compiled (no {} development files)", qt.name, qt.name);
            continue;
        };
        let flags = pkg_config(&[module]).unwrap();
        for h in ["entrupy_proxy", "entrupy_adaptor"] {
            check(
                Command::new(moc).current_dir(dir.path()).arg(format!("{h}.h")).arg("-o").arg(format!("moc_{h}.cpp")),
                &format!("{} moc {h}.h", qt.name),
            );
        }
        // The adaptors (the server side) only have to compile; the proxies are linked into
        // the client and run.
        check(
            Command::new("g++")
                .current_dir(dir.path())
                .args(["-std=c++17", "-fPIC", "-c", "entrupy_adaptor.cpp", "moc_entrupy_adaptor.cpp"])
                .args(&flags),
            &format!("{} compiling the adaptors", qt.name),
        );
        let exe = dir.path().join("qt_client");
        check(
            Command::new("g++")
                .current_dir(dir.path())
                .args(["-std=c++17", "-fPIC", "-Werror=return-type", "-o"])
                .arg(&exe)
                .arg(Path::new(FIXTURES).join("qt_client.cpp"))
                .args(["entrupy_proxy.cpp", "moc_entrupy_proxy.cpp", "-I."])
                .args(&flags),
            &format!("{} compiling the client", qt.name),
        );
        compiled += 1;

        let (env, _d) = env_with_valid_session().await;
        let s = env.session("default").await;
        let (token, exp) = s.get_token().await.unwrap();
        let out = run_client(&env, &exe, &names::session_path("default")).await;
        assert_eq!(line(&out, "IsAuthorizationValid:"), "IsAuthorizationValid: true", "{}", qt.name);
        assert_eq!(
            line(&out, "EnsureValid:"),
            format!("EnsureValid: token of {} bytes, expires_at {exp}", token.len()),
            "{}",
            qt.name
        );
        assert_eq!(line(&out, "State:"), "State: valid", "{}", qt.name);
        assert_eq!(line(&out, "ExpiresAt:"), format!("ExpiresAt: {exp}"), "{}", qt.name);
        assert_eq!(line(&out, "AddSession:"), format!("AddSession: {}", names::session_path("from-qt")));
        assert_eq!(line(&out, "AddSession again:"), "AddSession again: com.entrupy.TokenDaemon1.Error.AlreadyExists");
        assert!(!out.contains(&token), "{}: the client printed the token", qt.name);
        assert_eq!(env.session("from-qt").await.unique_user_id().await.unwrap(), "qt-user-0001");
    }
    println!("{compiled} of {} Qt installation(s) compiled and ran the client", qts.len());
}

/// The D-Bus types qdbusxml2cpp maps without help (basic types, and arrays it knows).
fn qt_knows(ty: &str) -> bool {
    (ty.len() == 1 && "ybnqiuxtdsogvh".contains(ty)) || ["as", "ay", "av", "ao"].contains(&ty)
}

#[test]
fn every_type_qt_cannot_map_has_a_qt_type_name() {
    let xml = std::fs::read_to_string(XML_FILE).unwrap();
    let node = Node::from_reader(xml.as_bytes()).unwrap();
    let has = |annotations: &[zbus_xml::Annotation], names: &[String]| {
        annotations.iter().any(|a| names.iter().any(|n| a.name() == n) && !a.value().is_empty())
    };
    let mut missing = Vec::new();
    for iface in node.interfaces() {
        for m in iface.methods() {
            let (mut n_in, mut n_out) = (0, 0);
            for a in m.args() {
                let key = match a.direction() {
                    Some(ArgDirection::Out) => {
                        n_out += 1;
                        format!("{QT_TYPE_NAME}.Out{}", n_out - 1)
                    }
                    Some(ArgDirection::In) | None => {
                        n_in += 1;
                        format!("{QT_TYPE_NAME}.In{}", n_in - 1)
                    }
                };
                let ty = a.ty().to_string();
                // Qt reads these annotations on the method element.
                if !qt_knows(&ty) && !has(m.annotations(), std::slice::from_ref(&key)) {
                    missing.push(format!("{}.{} {ty}: {key}", iface.name(), m.name()));
                }
            }
        }
        for s in iface.signals() {
            for (n, a) in s.args().iter().enumerate() {
                let ty = a.ty().to_string();
                // Qt 5 reads Out<n> on signals, Qt 6 also In<n>.
                let keys = [format!("{QT_TYPE_NAME}.Out{n}"), format!("{QT_TYPE_NAME}.In{n}")];
                if !qt_knows(&ty) && !has(s.annotations(), &keys) {
                    missing.push(format!("{}.{} {ty}: {}", iface.name(), s.name(), keys[0]));
                }
            }
        }
        for p in iface.properties() {
            let ty = p.ty().to_string();
            if !qt_knows(&ty) && !has(p.annotations(), &[QT_TYPE_NAME.to_owned()]) {
                missing.push(format!("{}.{} {ty}: {QT_TYPE_NAME}", iface.name(), p.name()));
            }
        }
    }
    assert!(missing.is_empty(), "qdbusxml2cpp cannot map these without an annotation: {missing:#?}");
    assert!(xml.contains(&format!(r#"<annotation name="{QT_TYPE_NAME}.In1" value="QVariantMap"/>"#)));
}

#[test]
fn the_member_docs_stand_on_their_own() {
    // The XML is installed for app developers: its docs must not send them to documents
    // they do not have.
    let xml = std::fs::read_to_string(XML_FILE).unwrap();
    for word in ["SPEC", "public contract", "ARCHITECTURE", "section 6", "§"] {
        assert!(!xml.contains(word), "the interface file mentions {word:?}");
    }
}
