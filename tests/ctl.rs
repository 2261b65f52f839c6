//! `entrupy-tokenctl` against a live daemon (SPEC 6): every command, the words and exit codes
//! of its failures, `login -`, `watch` to its end, and the bash completion it generates,
//! driven through bash itself. Each test has its own bus, simulator and daemon.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::proc::*;
use common::*;
use entrupy_tokend::names;
use rustix::process::Signal;

const T: Duration = Duration::from_secs(30);

fn tokenctl_cmd(address: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(TOKENCTL);
    cmd.args(args).env("DBUS_SESSION_BUS_ADDRESS", address);
    cmd
}

/// `entrupy-tokenctl` against `address` with `stdin` as its input, off the runtime's threads.
async fn ctl_input(address: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = tokenctl_cmd(address, args);
    let stdin = stdin.map(str::to_owned);
    let out = tokio::task::spawn_blocking(move || {
        cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        if let Some(input) = stdin {
            child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        }
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert_no_panic("entrupy-tokenctl", &text(&out.stderr));
    out
}

async fn ctl(env: &Env, args: &[&str]) -> Output {
    ctl_input(&env.bus.address, args, None).await
}

/// Asserts a failure with exit `code` reported as exactly one line on stderr; returns it.
fn one_line_error(what: &str, out: &Output, code: i32) -> String {
    assert_eq!(out.status.code(), Some(code), "{what}: exit code; stderr:\n{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{what}: one line on stderr, got:\n{err}");
    assert!(err.starts_with("entrupy-tokenctl: "), "{what}: {err}");
    err
}

// ---------------------------------------------------------------------------------------
// commands

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenctl_reads_and_refreshes_a_live_session() {
    let (env, d) = live(300).await;
    let s = env.session("default").await;

    let out = ok("status", &ctl(&env, &["status"]).await);
    assert!(out.starts_with("default: valid"), "{out}");
    assert!(out.contains("expires in"), "{out}");
    assert!(out.contains("next refresh"), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&ok("status --json", &ctl(&env, &["--json", "status"]).await)).unwrap();
    assert_eq!(v["state"], "valid");
    assert_eq!(v["valid"], true);
    assert_eq!(v["expires_at"].as_u64().unwrap(), s.expires_at().await.unwrap());
    assert_eq!(v["unique_user_id"], "user-0001-abcd");

    let out = ctl(&env, &["is-valid"]).await;
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "is-valid prints nothing");

    let (token, exp) = s.get_token().await.unwrap();
    let out = ok("token", &ctl(&env, &["token"]).await);
    assert_eq!(out.trim(), token);
    let v: serde_json::Value =
        serde_json::from_str(&ok("token --json", &ctl(&env, &["token", "--json"]).await)).unwrap();
    assert_eq!(v["token"], token.as_str());
    assert_eq!(v["expires_at"].as_u64().unwrap(), exp);

    // Enough time left: no login.
    let out = ok("token --min-valid 60", &ctl(&env, &["token", "--min-valid", "60"]).await);
    assert_eq!(out.trim(), token);
    assert_eq!(env.sim.counters().login_ok, 1);
    // More than any token covers: one refresh, the fresh token as it is.
    let out = ok("token --min-valid 3600", &ctl(&env, &["token", "--min-valid", "3600"]).await);
    assert_ne!(out.trim(), token);
    assert!(env.sim.token_is_valid(out.trim()));
    assert_eq!(env.sim.counters().login_ok, 2);

    let out = ok("refresh", &ctl(&env, &["refresh"]).await);
    assert!(out.contains("refreshed"), "{out}");
    assert_eq!(env.sim.counters().login_ok, 3);
    let v: serde_json::Value =
        serde_json::from_str(&ok("refresh --json", &ctl(&env, &["--json", "refresh"]).await)).unwrap();
    assert_eq!(v["expires_at"].as_u64().unwrap(), s.expires_at().await.unwrap());
    assert_eq!(env.sim.counters().login_ok, 4);

    let out = ok("request", &ctl(&env, &["request"]).await);
    assert!(entrupy_sim::decode_authorization_request(out.trim()).is_ok());
    let v: serde_json::Value =
        serde_json::from_str(&ok("request --json", &ctl(&env, &["--json", "request"]).await)).unwrap();
    assert!(entrupy_sim::decode_authorization_request(v["sdk_authorization_request"].as_str().unwrap()).is_ok());

    // A failed refresh: one line naming the error, exit 1, the old token still served.
    env.sim.push_fault(Endpoint::Login, Fault::Status { status: 503, body: None, retry_after: None }, 1);
    let err = one_line_error("refresh against a 503", &ctl(&env, &["refresh"]).await, 1);
    assert!(err.contains("ServerError"), "{err}");
    assert_eq!(ctl(&env, &["is-valid"]).await.status.code(), Some(0));

    // cleanup: not valid any more.
    ok("cleanup", &ctl(&env, &["cleanup"]).await);
    let out = ctl(&env, &["is-valid"]).await;
    assert_eq!(out.status.code(), Some(1), "not valid after cleanup");
    assert!(out.stderr.is_empty());
    let out = ok("status", &ctl(&env, &["status"]).await);
    assert!(out.starts_with("default: logged-out"), "{out}");
    let err = one_line_error("token after cleanup", &ctl(&env, &["token"]).await, 1);
    assert!(err.contains("NotAuthorized") && err.contains("login -"), "{err}");
    assert!(!err.contains(&token), "no secret in errors");
    assert_no_panic("entrupy-tokend", &d.log.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenctl_login_dash_reads_the_signed_request_from_stdin() {
    let (env, _d) = live(300).await;
    let request = ok("request", &ctl(&env, &["request"]).await);
    let signed = env.sim.sign_directly(request.trim(), "user-0001-abcd", "user@example.com");
    let before = env.sim.counters().login_ok;

    // One trailing newline (as `echo` and most tools write it) is not part of the request.
    let out = ctl_input(&env.bus.address, &["login", "-"], Some(&format!("{signed}\n"))).await;
    assert!(ok("login - with a newline", &out).contains("logged in"));
    assert_eq!(env.sim.counters().login_ok, before + 1);
    let request = ok("request", &ctl(&env, &["request"]).await);
    let signed = env.sim.sign_directly(request.trim(), "user-0001-abcd", "user@example.com");
    let out = ctl_input(&env.bus.address, &["--json", "login", "-"], Some(&format!("{signed}\r\n"))).await;
    let v: serde_json::Value = serde_json::from_str(&ok("login - --json with CRLF", &out)).unwrap();
    assert_eq!(v["expires_at"].as_u64().unwrap(), env.session("default").await.expires_at().await.unwrap());
    assert_eq!(env.sim.counters().login_ok, before + 2);

    // Nothing on standard input: a usage error, no call.
    let out = ctl_input(&env.bus.address, &["login", "-"], Some("")).await;
    let err = one_line_error("login - with empty input", &out, 2);
    assert!(err.contains("empty"), "{err}");
    assert_eq!(env.sim.counters().login_ok, before + 2);

    // The help says to prefer it.
    let help = ok("login --help", &ctl(&env, &["login", "--help"]).await);
    assert!(help.contains("standard input") && help.contains("prefer"), "{help}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenctl_manages_sessions_and_reports_errors_in_one_line() {
    let (env, _d) = live(300).await;
    let out = ok("sessions", &ctl(&env, &["sessions"]).await);
    assert!(out.lines().any(|l| l.starts_with("default\tvalid")), "{out}");

    let out = ctl(
        &env,
        &["add-session", "work-2", "--user-id", "user-0002-abcd", "--email", "w@example.com", "--first-name", "Ada"],
    )
    .await;
    assert_eq!(ok("add-session", &out).trim(), names::session_path("work-2"));
    wait_state(&env, "work-2", "valid").await;
    let v: serde_json::Value =
        serde_json::from_str(&ok("sessions --json", &ctl(&env, &["sessions", "--json"]).await)).unwrap();
    let ids: Vec<&str> = v.as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["default", "work-2"], "{v}");
    assert_eq!(v[1]["path"], names::session_path("work-2"));
    assert_eq!(ok("sessions --ids", &ctl(&env, &["sessions", "--ids"]).await), "default\nwork-2\n");
    let out = ok("status --session work-2", &ctl(&env, &["--session", "work-2", "status"]).await);
    assert!(out.starts_with("work-2: valid"), "{out}");

    let args = ["add-session", "work-2", "--user-id", "user-0002-abcd", "--email", "w@example.com"];
    let err = one_line_error("duplicate add-session", &ctl(&env, &args).await, 1);
    assert!(err.contains("AlreadyExists"), "{err}");
    let args = ["add-session", "Bad Id!", "--user-id", "user-0002-abcd", "--email", "w@example.com"];
    let err = one_line_error("bad add-session", &ctl(&env, &args).await, 1);
    assert!(err.contains("InvalidArgument"), "{err}");

    ok("remove-session", &ctl(&env, &["remove-session", "work-2"]).await);
    assert_eq!(session_ids(&env).await, vec![names::session_path("default")]);
    // The daemon's NoSuchSession and the bus's UnknownObject read the same.
    let nope = "entrupy-tokenctl: no session \"work-2\" (entrupy-tokenctl sessions lists them)\n";
    let err = one_line_error("remove-session again", &ctl(&env, &["remove-session", "work-2"]).await, 2);
    assert_eq!(err, nope);
    for cmd in ["status", "token", "refresh", "watch", "is-valid"] {
        let err = one_line_error(cmd, &ctl(&env, &["--session", "work-2", cmd]).await, 2);
        assert_eq!(err, nope, "{cmd}");
    }
    // A usage error is 2, and not a panic either.
    let out = ctl(&env, &["token", "--min-valid", "soon"]).await;
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenctl_without_a_daemon() {
    let env = Env::with_lifetime(Duration::from_secs(60)).await;
    // A bus, but nobody owns the name: every command says so, with the way to start it.
    for cmd in ["is-valid", "status", "watch", "sessions", "token"] {
        let err = one_line_error(cmd, &ctl(&env, &[cmd]).await, 2);
        assert!(err.contains("the daemon is not running") && err.contains("systemctl --user start"), "{cmd}: {err}");
    }
    // No bus at all.
    let nobus = format!("unix:path={}", env.path("no-such-dir/bus").display());
    for cmd in ["is-valid", "sessions"] {
        let err = one_line_error(cmd, &ctl_input(&nobus, &[cmd], None).await, 2);
        assert!(err.contains("cannot reach the D-Bus session bus"), "{err}");
    }
    // Completion asks quietly: nothing at all.
    let out = ctl(&env, &["sessions", "--ids"]).await;
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenctl_explains_an_activation_that_fails_on_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let services = dir.path().join("services");
    std::fs::create_dir(&services).unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[refresh\nmargin = 5m\n").unwrap();
    let unit = format!("[D-BUS Service]\nName={}\nExec={TOKEND} --config {}\n", names::BUS_NAME, config.display());
    std::fs::write(services.join(format!("{}.service", names::BUS_NAME)), unit).unwrap();
    let bus = Bus::start_with_services(Some(&services));
    for cmd in ["status", "is-valid"] {
        let err = one_line_error(cmd, &ctl_input(&bus.address, &[cmd], None).await, 2);
        assert_eq!(
            err, "entrupy-tokenctl: the daemon's configuration is invalid: run `entrupy-tokend --check-config`\n",
            "{cmd}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// watch

/// Starts `watch` (with `--json` when asked) and waits for its first line.
async fn start_watch(env: &Env, session: &str, json: bool) -> Proc {
    let mut args = vec!["--session", session, "watch"];
    if json {
        args.insert(0, "--json");
    }
    let w = Proc::spawn(tokenctl_cmd(&env.bus.address, &args));
    w.expect_stdout("watch printed its first line", |t| !t.is_empty()).await;
    w
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenctl_watch_prints_a_refresh() {
    let (env, _d) = live(300).await;
    let mut w = start_watch(&env, "default", false).await;
    ok("refresh", &ctl(&env, &["refresh"]).await);
    let out = w.expect_stdout("watch shows the refresh", |t| t.contains("LoginSucceeded")).await;
    assert!(out.lines().next().unwrap() == "default: State = valid", "{out}");
    assert!(out.contains("default: State = refreshing"), "no quotes around values:\n{out}");
    assert!(out.contains("default: LoginSucceeded: expires in "), "{out}");
    // ExpiresAt changes only when the refresh lands in another second; RefreshAt always does.
    let times = ["default: ExpiresAt = in ", "default: RefreshAt = in "];
    let timed: Vec<&str> = out.lines().filter(|l| times.iter().any(|t| l.starts_with(t))).collect();
    assert!(!timed.is_empty(), "{out}");
    assert!(timed.iter().all(|l| l.contains(" min at ")), "human times: {timed:?}");
    if let Some(l) = out.lines().find(|l| l.starts_with("default: LoginsToday = ")) {
        assert!(l["default: LoginsToday = ".len()..].parse::<u32>().is_ok(), "a plain number: {l}");
    }
    assert!(w.running(), "watch keeps running");
    w.signal(Signal::TERM);
    w.wait(T).await;

    let w = start_watch(&env, "default", true).await;
    ok("refresh", &ctl(&env, &["refresh"]).await);
    let out = w.expect_stdout("watch --json shows the refresh", |t| t.contains("LoginSucceeded")).await;
    let expires = env.session("default").await.expires_at().await.unwrap();
    for line in out.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert_eq!(v["session"], "default", "{line}");
        match v["event"].as_str().unwrap() {
            "property" if v["name"] == "ExpiresAt" || v["name"] == "RefreshAt" => {
                assert!(v["value"].is_u64(), "{line}")
            }
            "property" if v["name"] == "State" => assert!(v["value"].is_string(), "{line}"),
            "signal" if v["name"] == "LoginSucceeded" => assert_eq!(v["args"], serde_json::json!([expires]), "{line}"),
            "signal" => assert!(v["args"].is_array(), "{line}"),
            "property" => {}
            other => panic!("unexpected event {other}: {line}"),
        }
    }
    assert_no_panic("watch", &w.stderr.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenctl_watch_ends_when_the_session_is_removed_or_the_daemon_stops() {
    let (env, mut d) = live(300).await;
    let args = ["add-session", "temp", "--user-id", "user-0003-abcd", "--email", "t@example.com"];
    ok("add-session", &ctl(&env, &args).await);
    let mut w = start_watch(&env, "temp", false).await;
    let mut wj = start_watch(&env, "temp", true).await;
    ok("remove-session", &ctl(&env, &["remove-session", "temp"]).await);
    assert_eq!(w.wait(T).await.code(), Some(1), "stdout:\n{}", w.stdout.text());
    assert_eq!(w.stdout.text().lines().last(), Some("temp: the session was removed"));
    assert_eq!(wj.wait(T).await.code(), Some(1));
    let last: serde_json::Value = serde_json::from_str(wj.stdout.text().lines().last().unwrap()).unwrap();
    assert_eq!(last, serde_json::json!({"session": "temp", "event": "removed"}));

    let mut w = start_watch(&env, "default", false).await;
    d.stop();
    assert_eq!(w.wait(T).await.code(), Some(2), "stdout:\n{}", w.stdout.text());
    let last = w.stdout.text().lines().last().unwrap().to_owned();
    assert!(last.starts_with("default: the daemon stopped"), "{last}");
}

// ---------------------------------------------------------------------------------------
// shell completion

/// What the generated bash completion offers for the words (the last one being completed).
fn bash_complete(bin_dir: &std::path::Path, address: &str, words: &[&str]) -> Vec<String> {
    let script = Command::new(TOKENCTL).args(["--generate-completions", "bash"]).output().unwrap();
    assert!(script.status.success());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("entrupy-tokenctl.bash");
    std::fs::write(&path, &script.stdout).unwrap();
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let driver = format!(
        "source '{}'\nCOMP_WORDS=({})\nCOMP_CWORD={}\nCOMP_LINE=\"${{COMP_WORDS[*]}}\"\nCOMP_POINT=${{#COMP_LINE}}\n\
         _entrupy__tokenctl entrupy-tokenctl '{}' '{}'\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
        path.display(),
        quoted.join(" "),
        words.len() - 1,
        words[words.len() - 1],
        words[words.len() - 2],
    );
    let path_var = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let out = Command::new("bash")
        .args(["--noprofile", "--norc", "-c", &driver])
        .env("PATH", path_var)
        .env("DBUS_SESSION_BUS_ADDRESS", address)
        .output()
        .unwrap();
    assert!(out.status.success(), "bash: {}", text(&out.stderr));
    let mut v: Vec<String> = text(&out.stdout).lines().filter(|l| !l.is_empty()).map(str::to_owned).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bash_completion_offers_subcommand_options_and_live_session_ids() {
    let (env, _d) = live(300).await;
    let args = ["add-session", "work-2", "--user-id", "user-0002-abcd", "--email", "w@example.com"];
    ok("add-session", &ctl(&env, &args).await);
    let bin_dir = std::path::Path::new(TOKENCTL).parent().unwrap().to_owned();
    let address = env.bus.address.clone();
    let got = tokio::task::spawn_blocking(move || {
        (
            bash_complete(&bin_dir, &address, &["entrupy-tokenctl", "token", "--"]),
            bash_complete(&bin_dir, &address, &["entrupy-tokenctl", "--session", ""]),
            bash_complete(&bin_dir, &address, &["entrupy-tokenctl", "status", "--session", "w"]),
            bash_complete(&bin_dir, &address, &["entrupy-tokenctl", "to"]),
            bash_complete(&bin_dir, &address, &["entrupy-tokenctl", "remove-session", ""]),
            bash_complete(&bin_dir, &address, &["entrupy-tokenctl", "remove-session", "--j"]),
        )
    })
    .await
    .unwrap();
    assert_eq!(got.0, ["--help", "--json", "--min-valid", "--session"]);
    assert_eq!(got.1, ["default", "work-2"]);
    assert_eq!(got.2, ["work-2"]);
    assert_eq!(got.3, ["token"]);
    assert_eq!(got.4, ["default", "work-2"], "remove-session's ID");
    assert_eq!(got.5, ["--json"]);
}
