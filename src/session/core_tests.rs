//! Tables of inputs and effects for [`Core`]: no runtime, no sleeping.

use super::*;

fn params() -> Params {
    Params {
        margin: 10.0,
        jitter: 2.0,
        backoff_initial: 2.0,
        backoff_max: 60.0,
        budget: Budget { per_minute: 5, per_day: 100 },
        reserved_for_refresh: 10,
        pace: true,
    }
}

fn settings(has_backend: bool) -> Settings {
    Settings { unique_user_id: Arc::from("user-0001"), params: params(), has_backend }
}

/// A session, the ledger and the clock, stepped together.
struct Rig {
    core: Core,
    ledger: Ledger,
    now: f64,
    u: f64,
}

impl Rig {
    fn new(has_backend: bool) -> Self {
        Rig { core: Core::new(settings(has_backend)), ledger: Ledger::default(), now: 1000.0, u: 0.0 }
    }

    fn step(&mut self, input: Input) -> Vec<Effect> {
        let mut cx = Ctx { now: self.now, u: self.u, ledger: &mut self.ledger };
        self.core.step(input, &mut cx)
    }

    fn state(&self) -> State {
        self.core.state(self.now)
    }

    fn next_wake(&self) -> Option<f64> {
        self.core.next_wake(&self.ledger, self.now)
    }

    /// Logs in through the backend: the tick starts an attempt, which succeeds and is saved.
    fn logged_in(lifetime: f64) -> Self {
        let mut r = Rig::new(true);
        assert_eq!(r.step(Input::Tick), vec![Effect::SaveLedger, Effect::Start(1, AttemptKind::Backend)]);
        r.succeed(1, lifetime);
        r
    }

    fn succeed(&mut self, id: u64, lifetime: f64) -> Vec<Effect> {
        let ok = success(self.now, lifetime);
        let fx = self.step(Input::AttemptDone(id, AttemptResult::Ok(ok)));
        assert!(matches!(fx.as_slice(), [Effect::Commit(i, _)] if *i == id), "{fx:?}");
        self.step(Input::Saved(id))
    }
}

fn success(now: f64, lifetime: f64) -> Success {
    Success { token: Secret::new("tok"), expires_at: now + lifetime, username: Some("Ada".into()), received_at: now }
}

fn failure(outcome: Outcome, name: ErrorName) -> AttemptResult {
    AttemptResult::Err(AttemptFailure {
        outcome,
        error: ApiError::new(name, "it failed"),
        code: name.as_str().into(),
        description: "it failed".into(),
        stamp: None,
    })
}

fn replies(fx: &[Effect]) -> Vec<(CallId, Reply)> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Reply(c, r) => Some((*c, r.clone())),
            _ => None,
        })
        .collect()
}

fn err_name(r: &Reply) -> Option<ErrorName> {
    match r {
        Reply::Err(e) => Some(e.name),
        _ => None,
    }
}

#[test]
fn a_fresh_session_logs_in_at_once_and_states_follow() {
    let r = Rig::new(true);
    assert_eq!(r.state(), State::Expired);
    assert_eq!(r.next_wake(), Some(f64::NEG_INFINITY));
    let r = Rig::new(false);
    assert_eq!(r.state(), State::LoggedOut);
    assert_eq!(r.next_wake(), None);
    let mut r = Rig::logged_in(100.0);
    assert_eq!(r.state(), State::Valid);
    assert_eq!(r.core.refresh_at_property(&r.ledger, r.now), 1090.0);
    assert_eq!(r.next_wake(), Some(1090.0));
    r.now = 1100.0;
    assert_eq!(r.state(), State::Expired);
}

#[test]
fn a_success_is_answered_and_published_only_once_it_is_saved() {
    let mut r = Rig::logged_in(100.0);
    r.now = 1050.0;
    let fx = r.step(Input::Refresh(7));
    assert_eq!(fx, vec![Effect::SaveLedger, Effect::Start(2, AttemptKind::Backend)]);
    assert_eq!(r.state(), State::Refreshing);
    // A second caller joins the attempt under way: no second login.
    assert_eq!(r.step(Input::EnsureValid(8, 3600)), vec![]);
    let fx = r.step(Input::AttemptDone(2, AttemptResult::Ok(success(1050.0, 200.0))));
    let [Effect::Commit(2, record)] = fx.as_slice() else { panic!("{fx:?}") };
    assert_eq!(record.expires_at, Some(1250.0));
    // Not applied before the disk has it.
    assert_eq!(r.core.expires_at(), Some(1100.0));
    assert_eq!(r.state(), State::Refreshing);
    let fx = r.step(Input::Saved(2));
    assert_eq!(fx[0], Effect::Signal(Signal::LoginSucceeded(1250.0)));
    assert_eq!(replies(&fx), vec![(7, Reply::Expiry(1250.0)), (8, Reply::Token(Secret::new("tok"), 1250.0))]);
    assert_eq!(r.state(), State::Valid);
    assert_eq!(r.ledger.logins_today("user-0001", r.now), 2);
}

#[test]
fn ensure_valid_is_answered_from_the_token_when_it_suffices() {
    let mut r = Rig::logged_in(100.0);
    assert_eq!(r.step(Input::EnsureValid(1, 50)), vec![Effect::Reply(1, Reply::Token(Secret::new("tok"), 1100.0))]);
    let fx = r.step(Input::EnsureValid(2, 500));
    assert_eq!(fx, vec![Effect::SaveLedger, Effect::Start(2, AttemptKind::Backend)]);
}

#[test]
fn the_reservation_is_written_before_the_attempt_starts_and_freed_when_it_fails() {
    let mut r = Rig::new(true);
    let fx = r.step(Input::Tick);
    assert_eq!(fx, vec![Effect::SaveLedger, Effect::Start(1, AttemptKind::Backend)]);
    assert_eq!(r.ledger.history("user-0001"), vec![1000.0]);
    // A reservation that could not be written: nothing was sent; back off.
    let fx = r.step(Input::AttemptDone(1, failure(Outcome::NotSent, ErrorName::Cancelled)));
    assert_eq!(fx[..2], [Effect::SaveLedger, Effect::Save]);
    assert!(r.ledger.history("user-0001").is_empty());
    assert_eq!(r.state(), State::Expired);
    assert!(r.next_wake().is_some_and(|t| t > 1000.0));
}

#[test]
fn outcomes_table() {
    // (outcome, asked, state after, retrying after)
    let table = [
        (Outcome::Transient, false, State::Valid, true),
        (Outcome::Transient, true, State::Valid, false),
        (Outcome::RateLimited(Some(30.0)), false, State::Valid, true),
        (Outcome::Reauthorize, false, State::NeedsReauthorization, false),
        (Outcome::Permanent, true, State::Failed, false),
    ];
    for (outcome, asked, state, retrying) in table {
        let mut r = Rig::logged_in(100.0);
        r.now = 1010.0;
        let input = if asked { Input::Refresh(1) } else { Input::Tick };
        if !asked {
            r.now = 1090.0;
        }
        let fx = r.step(input);
        assert!(fx.contains(&Effect::Start(2, AttemptKind::Backend)), "{outcome:?}: {fx:?}");
        let fx = r.step(Input::AttemptDone(2, failure(outcome, ErrorName::NetworkError)));
        assert_eq!(r.state(), state, "{outcome:?} asked={asked}");
        assert_eq!(r.core.retry_at.is_some(), retrying, "{outcome:?} asked={asked}");
        assert!(fx.iter().any(|e| matches!(e, Effect::Signal(Signal::LoginFailed(..)))));
        let reauth = fx.contains(&Effect::Signal(Signal::ReauthorizationRequired));
        assert_eq!(reauth, outcome == Outcome::Reauthorize, "{outcome:?}");
        if asked {
            assert_eq!(replies(&fx).first().and_then(|(_, r)| err_name(r)), Some(ErrorName::NetworkError));
        }
        assert_eq!(r.core.last_error(), Some(ErrorName::NetworkError));
    }
}

#[test]
fn a_429_holds_clients_back_until_retry_after() {
    let mut r = Rig::logged_in(100.0);
    r.now = 1090.0;
    r.step(Input::Tick);
    r.step(Input::AttemptDone(2, failure(Outcome::RateLimited(Some(30.0)), ErrorName::TooManyRequests)));
    assert_eq!(r.next_wake(), Some(1100.0), "the expiry flip comes first");
    assert_eq!(r.core.refresh_at_property(&r.ledger, r.now), 1120.0);
    let fx = r.step(Input::Refresh(5));
    assert_eq!(err_name(&replies(&fx)[0].1), Some(ErrorName::TooManyRequests));
}

#[test]
fn a_rejected_signed_request_of_a_client_leaves_the_session_alone() {
    let mut r = Rig::logged_in(100.0);
    let fx = r.step(Input::LoginSigned(3, Secret::new("signed")));
    assert_eq!(fx, vec![Effect::SaveLedger, Effect::Start(2, AttemptKind::Signed(Secret::new("signed")))]);
    let fx = r.step(Input::AttemptDone(2, failure(Outcome::Reauthorize, ErrorName::Unauthorized)));
    assert_eq!(err_name(&replies(&fx)[0].1), Some(ErrorName::Unauthorized));
    assert_eq!(r.state(), State::Valid);
    assert_eq!(r.core.retry_at, None);
    assert_eq!(r.core.last_error(), Some(ErrorName::Unauthorized));
}

#[test]
fn signed_callers_wait_for_the_attempt_under_way_and_share_its_success() {
    let mut r = Rig::new(true);
    r.step(Input::Tick);
    assert_eq!(r.step(Input::LoginSigned(4, Secret::new("a"))), vec![]);
    assert_eq!(r.step(Input::LoginSigned(5, Secret::new("b"))), vec![]);
    let fx = r.succeed(1, 100.0);
    assert_eq!(replies(&fx), vec![(4, Reply::Expiry(1100.0)), (5, Reply::Expiry(1100.0))]);
    // After a failure, the next one in line uses its own request.
    let mut r = Rig::new(true);
    r.step(Input::Tick);
    r.step(Input::LoginSigned(4, Secret::new("a")));
    let fx = r.step(Input::AttemptDone(1, failure(Outcome::Transient, ErrorName::NetworkError)));
    assert!(fx.contains(&Effect::Start(2, AttemptKind::Signed(Secret::new("a")))), "{fx:?}");
}

#[test]
fn the_expiry_flip_is_signalled_once() {
    let mut r = Rig::logged_in(100.0);
    r.core.settings.has_backend = false;
    r.core.refresh_at = None;
    r.now = 1100.0;
    assert_eq!(r.step(Input::Tick), vec![Effect::Signal(Signal::AuthorizationExpired)]);
    assert_eq!(r.step(Input::Tick), vec![]);
    assert_eq!(r.state(), State::Expired);
    assert_eq!(r.core.expires_at(), Some(1100.0), "ExpiresAt keeps the old expiry");
}

#[test]
fn cleanup_cancels_and_stops_refreshing_until_a_client_asks() {
    let mut r = Rig::logged_in(100.0);
    r.step(Input::Refresh(1));
    let fx = r.step(Input::Cleanup(2));
    assert_eq!(fx[0], Effect::Cancel(2));
    assert_eq!(err_name(&replies(&fx)[0].1), Some(ErrorName::Cancelled));
    assert_eq!(replies(&fx)[1], (2, Reply::Done));
    assert!(fx.contains(&Effect::Save));
    assert_eq!(r.state(), State::LoggedOut);
    assert_eq!(r.next_wake(), None);
    assert!(r.core.persisted().logged_out);
    // The cancelled attempt's result is ignored.
    assert_eq!(r.step(Input::AttemptDone(2, AttemptResult::Ok(success(1000.0, 100.0)))), vec![]);
    // A client brings it back.
    let fx = r.step(Input::Refresh(3));
    assert!(fx.contains(&Effect::Start(3, AttemptKind::Backend)));
}

#[test]
fn clients_cannot_spend_the_reserve_of_the_daily_budget() {
    let mut r = Rig::logged_in(100.0);
    // 89 more logins earlier today: 90 used, 10 left, all of them kept for refreshes.
    let earlier: Vec<f64> = (0..89).map(|i| 100.0 + f64::from(i) * 61.0).collect();
    let mut history = r.ledger.history("user-0001");
    history.extend(earlier);
    r.ledger = Ledger::from_histories([("user-0001".to_owned(), history)]);
    r.now = 7000.0;
    for input in [Input::Refresh(1), Input::EnsureValid(2, 1_000_000), Input::LoginSigned(3, Secret::new("s"))] {
        let fx = r.step(input);
        let (_, reply) = &replies(&fx)[0];
        let Reply::Err(e) = reply else { panic!("{fx:?}") };
        assert_eq!(e.name, ErrorName::TooManyRequests);
        assert!(e.message.contains("kept for automatic refreshes"), "{}", e.message);
        assert!(e.message.contains("1970-01-02T00:01:40Z"), "says when it frees: {}", e.message);
    }
    // The daemon's own refresh may still use it.
    r.now = 1090.0 + 86_400.0 * 0.0 + 6000.0;
    r.core.refresh_at = Some(r.now);
    assert!(r.step(Input::Tick).contains(&Effect::Start(2, AttemptKind::Backend)));
}

#[test]
fn network_return_ends_a_backoff_wait_at_most_once_per_initial_backoff() {
    let mut r = Rig::new(true);
    r.u = 0.99;
    r.step(Input::Tick);
    r.step(Input::AttemptDone(1, failure(Outcome::Transient, ErrorName::NetworkError)));
    r.step(Input::Tick);
    r.now += 0.5;
    r.core.retry_at = Some(r.now + 30.0);
    r.step(Input::NetworkUp);
    assert_eq!(r.core.retry_at, Some(r.now));
    // The attempt that starts now is not affected by the next kick.
    let before = r.core.retry_at;
    r.core.retry_at = Some(r.now + 30.0);
    r.now += 1.0;
    r.step(Input::NetworkUp);
    assert_ne!(r.core.retry_at, before, "a second kick within backoff_initial is ignored");
    assert_eq!(r.core.retry_at, Some(r.now + 29.0));
}

#[test]
fn reconfigure_rules() {
    // A new user drops the token.
    let mut r = Rig::logged_in(100.0);
    let mut s = settings(true);
    s.unique_user_id = Arc::from("user-0002");
    let fx = r.step(Input::Reconfigure(s));
    assert!(fx.contains(&Effect::Save));
    assert_eq!(r.core.token(), None);
    assert_eq!(r.core.username().as_ref(), "");
    assert!(fx.contains(&Effect::Start(2, AttemptKind::Backend)), "logs the new user in: {fx:?}");
    // The same user: a waiting session tries again; a shorter margin moves the refresh.
    let mut r = Rig::logged_in(100.0);
    r.core.mode = Mode::NeedsReauth;
    let mut s = settings(true);
    s.params.margin = 40.0;
    r.step(Input::Reconfigure(s));
    assert_eq!(r.state(), State::Valid);
    assert_eq!(r.core.refresh_at, Some(1060.0));
    // Without a backend: no automatic attempts.
    let mut r = Rig::new(true);
    r.step(Input::Reconfigure(settings(false)));
    assert_eq!(r.state(), State::LoggedOut);
    // A backend configured later logs in, unless a client cleaned up.
    let mut r = Rig::new(false);
    assert!(r.step(Input::Reconfigure(settings(true))).contains(&Effect::Start(1, AttemptKind::Backend)));
    let mut r = Rig::new(false);
    r.step(Input::Cleanup(1));
    assert!(!r.step(Input::Reconfigure(settings(true))).iter().any(|e| matches!(e, Effect::Start(..))));
}

#[test]
fn a_credential_change_lets_a_waiting_session_try_again() {
    let mut r = Rig::new(true);
    r.step(Input::Tick);
    let mut f = failure(Outcome::Reauthorize, ErrorName::Unauthorized);
    if let AttemptResult::Err(e) = &mut f {
        e.stamp = Some((1, 0, 10, 7));
    }
    r.step(Input::AttemptDone(1, f));
    assert_eq!(r.state(), State::NeedsReauthorization);
    assert!(r.core.waits_for_change());
    assert_eq!(r.step(Input::CredentialChecked(Some((1, 0, 10, 7)))), vec![]);
    let fx = r.step(Input::CredentialChecked(Some((2, 0, 10, 7))));
    assert!(fx.contains(&Effect::Start(2, AttemptKind::Backend)));
}

#[test]
fn stop_cancels_callers() {
    let mut r = Rig::new(true);
    r.step(Input::Refresh(1));
    r.step(Input::LoginSigned(2, Secret::new("s")));
    let fx = r.step(Input::Stop("shutting down".into()));
    assert_eq!(fx[0], Effect::Cancel(1));
    let names: Vec<_> = replies(&fx).iter().map(|(c, r)| (*c, err_name(r))).collect();
    assert_eq!(names, vec![(1, Some(ErrorName::Cancelled)), (2, Some(ErrorName::Cancelled))]);
}

/// Storm regression (Vault Agent once sent hundreds of failing renewals a second): with
/// the upstream failing for three hours of simulated time, attempts stay within what the
/// backoff allows, keep going at the capped interval after expiry, and never loop tightly.
#[test]
fn a_failing_upstream_for_hours_stays_within_the_backoff() {
    let mut r = Rig::new(true);
    r.core.settings.params = Params {
        margin: 300.0,
        jitter: 30.0,
        backoff_max: 300.0,
        budget: Budget { per_minute: 5, per_day: 100_000 },
        ..params()
    };
    r.now = 0.0;
    r.step(Input::Tick);
    r.succeed(1, 3600.0);
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut attempts = Vec::new();
    let end = 3.0 * 3600.0 + 3300.0;
    while let Some(due) = r.next_wake() {
        r.now = r.now.max(due);
        if r.now > end {
            break;
        }
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        r.u = (seed >> 11) as f64 / (1u64 << 53) as f64;
        let fx = r.step(Input::Tick);
        if let Some(Effect::Start(id, _)) = fx.iter().find(|e| matches!(e, Effect::Start(..))) {
            attempts.push(r.now);
            r.step(Input::AttemptDone(*id, failure(Outcome::Transient, ErrorName::NetworkError)));
        }
    }
    assert_eq!(attempts[0], 3300.0, "the first attempt is the planned refresh");
    let gaps: Vec<f64> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.iter().all(|g| *g >= 0.02), "never a tight loop");
    assert!(gaps.iter().all(|g| *g <= 300.0), "never longer than the cap");
    assert!(attempts.len() < 200, "{} attempts in three hours", attempts.len());
    assert!(attempts.len() > 36, "kept trying after expiry: {} attempts", attempts.len());
    assert_eq!(r.core.state(end), State::Expired);
}

#[test]
fn pacing_spreads_logins_once_half_the_budget_is_used() {
    let mut r = Rig::logged_in(100.0);
    r.core.last_attempt_at = Some(999.0);
    assert_eq!(r.core.pace_until(10), None, "the first half of the budget goes at the natural pace");
    assert_eq!(r.core.pace_until(50), Some(999.0 + 864.0));
    // Long-lived tokens are never paced.
    r.now = 1000.0;
    r.step(Input::Refresh(1));
    r.succeed(2, 4000.0);
    assert_eq!(r.core.pace_until(99), None);
}

#[test]
fn restore_refreshes_only_past_the_refresh_point() {
    let p = Persisted {
        token: Some(Secret::new("t")),
        expires_at: Some(1100.0),
        last_login_at: Some(1000.0),
        refresh_at: Some(1089.0),
        ..Default::default()
    };
    let ledger = Ledger::default();
    let c = Core::restore(settings(true), &p, 1050.0);
    assert_eq!(c.next_wake(&ledger, 1050.0), Some(1089.0));
    assert_eq!(c.state(1050.0), State::Valid);
    let c = Core::restore(settings(true), &p, 1095.0);
    assert!(c.next_wake(&ledger, 1095.0).unwrap() <= 1095.0);
    let out = Persisted { logged_out: true, ..p };
    let c = Core::restore(settings(true), &out, 1050.0);
    assert_eq!(c.state(1050.0), State::LoggedOut);
    assert_eq!(c.next_wake(&ledger, 1050.0), None);
}

/// The core stays pure: it names no runtime, bus, HTTP client or file system.
#[test]
fn the_core_imports_no_runtime_bus_http_or_disk() {
    let forbidden = ["tokio", "zbus", "reqwest", "std::fs", "crate::store", "crate::http", "crate::bus"];
    for (name, text) in [
        ("core.rs", include_str!("core.rs")),
        ("ledger.rs", include_str!("../ledger.rs")),
        ("timers.rs", include_str!("../timers.rs")),
        ("sweep.rs", include_str!("../sweep.rs")),
        ("policy.rs", include_str!("../policy.rs")),
    ] {
        for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
            for f in forbidden {
                assert!(!line.contains(f), "{name} mentions {f}: {line}");
            }
        }
    }
}
