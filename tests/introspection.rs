//! `data/com.entrupy.TokenDaemon1.xml`, the installed description of the D-Bus API, against
//! what a live daemon serves: the same interfaces, members, argument names, types and
//! directions, property types and access, and signals. Also: the file parses without
//! warnings, every interface, member and argument is documented with
//! `org.gtk.GDBus.DocString`, and `gdbus-codegen` accepts it (when installed).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(unused_imports)] // the harness re-exports more than this test uses
mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::*;
use entrupy_tokend::names;
use zbus_xml::{ArgDirection, Node, PropertyAccess};

const XML_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/com.entrupy.TokenDaemon1.xml");
const DOC: &str = "org.gtk.GDBus.DocString";

fn read_file() -> String {
    std::fs::read_to_string(XML_FILE).unwrap()
}

/// Parses introspection XML, failing on anything the parser had to skip.
fn parse(xml: &str, what: &str) -> Node<'static> {
    let (node, warnings) = Node::from_reader_with_warnings(xml.as_bytes())
        .unwrap_or_else(|e| panic!("{what} is not valid introspection XML: {e}"));
    assert!(warnings.is_empty(), "{what}: {warnings:?}");
    node
}

/// One line per fact of the project's interfaces (`com.entrupy.*`) in `node`; annotations and
/// the standard `org.freedesktop.*` interfaces are left out. Members are keyed by name, so
/// their order does not matter; arguments keep their position.
fn facts(node: &Node<'_>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for iface in node.interfaces().iter().filter(|i| i.name().as_str().starts_with("com.entrupy.")) {
        let i = iface.name().to_string();
        out.insert(format!("interface {i}"));
        for m in iface.methods() {
            out.insert(format!("{i} method {}", m.name()));
            for (n, a) in m.args().iter().enumerate() {
                let dir = match a.direction() {
                    Some(ArgDirection::Out) => "out",
                    // `in` is the default for method arguments.
                    Some(ArgDirection::In) | None => "in",
                };
                out.insert(format!(
                    "{i} method {} arg #{n} name={:?} type={} direction={dir}",
                    m.name(),
                    a.name(),
                    a.ty()
                ));
            }
        }
        for s in iface.signals() {
            out.insert(format!("{i} signal {}", s.name()));
            for (n, a) in s.args().iter().enumerate() {
                out.insert(format!("{i} signal {} arg #{n} name={:?} type={}", s.name(), a.name(), a.ty()));
            }
        }
        for p in iface.properties() {
            let access = match p.access() {
                PropertyAccess::Read => "read",
                PropertyAccess::Write => "write",
                PropertyAccess::ReadWrite => "readwrite",
            };
            out.insert(format!("{i} property {} type={} access={access}", p.name(), p.ty()));
        }
    }
    out
}

/// The facts of the file's interface `iface` (to compare with one object's live XML).
fn facts_of(node: &Node<'_>, iface: &str) -> BTreeSet<String> {
    facts(node)
        .into_iter()
        .filter(|f| f.starts_with(&format!("{iface} ")) || *f == format!("interface {iface}"))
        .collect()
}

/// Empty when equal, else a readable list of what each side has that the other lacks.
fn diff(file: &BTreeSet<String>, live: &BTreeSet<String>) -> String {
    let mut d = String::new();
    for f in file.difference(live) {
        d.push_str(&format!("  only in the file:   {f}\n"));
    }
    for f in live.difference(file) {
        d.push_str(&format!("  only in the daemon: {f}\n"));
    }
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_interface_file_matches_the_live_daemon() {
    let env = Env::new(SimConfig::default()).await;
    env.write_config(&Cfg::default());
    let _d = env.start_daemon().await;

    let file = parse(&read_file(), "the interface file");
    let manager_live = parse(&introspect(&env, names::MANAGER_PATH).await, "the manager's live XML");
    let session_live = parse(&introspect(&env, &names::session_path("default")).await, "the session's live XML");

    let live_manager = facts(&manager_live);
    let live_session = facts(&session_live);
    assert!(live_manager.contains(&format!("interface {}", names::MANAGER_INTERFACE)), "{live_manager:#?}");
    assert!(live_session.contains(&format!("interface {}", names::SESSION_INTERFACE)), "{live_session:#?}");
    // The manager object serves only the Manager interface, a session object only Session.
    assert_eq!(live_manager.iter().filter(|f| f.starts_with("interface ")).count(), 1);
    assert_eq!(live_session.iter().filter(|f| f.starts_with("interface ")).count(), 1);

    let d = diff(&facts_of(&file, names::MANAGER_INTERFACE), &live_manager);
    assert!(d.is_empty(), "data/com.entrupy.TokenDaemon1.xml disagrees with the daemon (Manager):\n{d}");
    let d = diff(&facts_of(&file, names::SESSION_INTERFACE), &live_session);
    assert!(d.is_empty(), "data/com.entrupy.TokenDaemon1.xml disagrees with the daemon (Session):\n{d}");

    // Nothing else in the file: exactly the two interfaces.
    let ifaces: Vec<_> = file.interfaces().iter().map(|i| i.name().to_string()).collect();
    assert_eq!(ifaces, [names::MANAGER_INTERFACE, names::SESSION_INTERFACE]);
    assert!(file.nodes().is_empty(), "the interface file describes interfaces, not an object tree");
}

#[test]
fn the_comparison_notices_a_changed_argument_name_type_or_member() {
    let xml = read_file();
    let base = facts(&parse(&xml, "the file"));
    for (from, to) in [
        (r#"name="min_seconds" type="u""#, r#"name="seconds" type="u""#),
        (r#"name="min_seconds" type="u""#, r#"name="min_seconds" type="t""#),
        (r#"<signal name="AuthorizationExpired">"#, r#"<signal name="AuthorizationLapsed">"#),
        (r#"<property name="Valid" type="b" access="read">"#, r#"<property name="Valid" type="b" access="readwrite">"#),
        (r#"<arg name="sessions" type="ao" direction="out">"#, r#"<arg name="sessions" type="ao" direction="in">"#),
        (r#"<arg name="token" type="s" direction="out">"#, r#"<arg name="token" type="u" direction="out">"#),
    ] {
        assert!(xml.contains(from), "{from}");
        let changed = facts(&parse(&xml.replacen(from, to, 1), "the changed file"));
        assert!(!diff(&base, &changed).is_empty(), "replacing {from} by {to} went unnoticed");
    }
}

#[test]
fn every_interface_member_and_argument_is_documented() {
    let node = parse(&read_file(), "the interface file");
    let has_doc = |annotations: &[zbus_xml::Annotation]| {
        annotations.iter().any(|a| a.name() == DOC && a.value().split_whitespace().count() >= 2)
    };
    let mut missing = Vec::new();
    for iface in node.interfaces() {
        let i = iface.name().to_string();
        if !has_doc(&iface.annotations().cloned().collect::<Vec<_>>()) {
            missing.push(i.clone());
        }
        for m in iface.methods() {
            if !has_doc(m.annotations()) {
                missing.push(format!("{i}.{}", m.name()));
            }
            for (n, a) in m.args().iter().enumerate() {
                if !has_doc(a.annotations()) {
                    missing.push(format!("{i}.{} arg #{n}", m.name()));
                }
            }
        }
        for s in iface.signals() {
            if !has_doc(s.annotations()) {
                missing.push(format!("{i}.{}", s.name()));
            }
            for (n, a) in s.args().iter().enumerate() {
                if !has_doc(a.annotations()) {
                    missing.push(format!("{i}.{} arg #{n}", s.name()));
                }
            }
        }
        for p in iface.properties() {
            if !has_doc(p.annotations()) {
                missing.push(format!("{i}.{}", p.name()));
            }
        }
    }
    assert!(missing.is_empty(), "without an {DOC} annotation: {missing:?}");
}

#[test]
fn the_error_names_of_the_spec_are_documented() {
    let xml = read_file();
    for name in entrupy_tokend::error::ErrorName::ALL {
        assert!(xml.contains(name.as_str()), "{name} is not mentioned in the interface file");
    }
}

#[test]
fn gdbus_codegen_accepts_the_file() {
    if Command::new("gdbus-codegen").arg("--help").output().is_err() {
        println!("SKIPPED: gdbus-codegen is not installed (apt-get install libglib2.0-dev-bin)");
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let codegen = Command::new("gdbus-codegen")
        .current_dir(out.path())
        .args(["--interface-prefix", "com.entrupy.TokenDaemon1.", "--c-namespace", "Entrupy"])
        .args(["--generate-c-code", "entrupy-tokend-dbus", "--generate-docbook", "doc"])
        .arg(XML_FILE)
        .output()
        .unwrap();
    assert!(codegen.status.success(), "gdbus-codegen failed: {}", String::from_utf8_lossy(&codegen.stderr));
    let header = std::fs::read_to_string(out.path().join("entrupy-tokend-dbus.h")).unwrap();
    for sym in
        ["entrupy_manager_call_list_sessions", "entrupy_session_call_ensure_valid", "entrupy_session_get_expires_at"]
    {
        assert!(header.contains(sym), "{sym} not generated");
    }
    let doc = Path::new(out.path()).join("doc-com.entrupy.TokenDaemon1.Session.xml");
    let doc = std::fs::read_to_string(doc).unwrap();
    assert!(doc.contains("needs-reauthorization"), "the DocStrings reach the generated documentation");
}
