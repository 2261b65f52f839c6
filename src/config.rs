//! The configuration file (SPEC section 3): parsing, defaults and validation.
//!
//! [`parse`] is pure: text in, a validated [`Config`] or a [`ConfigError`] out. [`load`] finds
//! and reads the file and checks what only the file system can tell (credential files, read
//! by [`crate::credential::read`]); [`check_state_dir`] creates and checks the state
//! directory. Nothing here starts tasks or talks to the network.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// The default Entrupy API base URL.
pub const DEFAULT_API_URL: &str = "https://api.entrupy.com";

/// A configuration error. Its `Display` names the file, the key and, when known, the line
/// and column (counted from 1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.render())]
pub struct ConfigError {
    /// The file the error is in (or `<string>`).
    pub file: String,
    /// The dotted key, for example `refresh.margin` or `session[1].id`.
    pub key: Option<String>,
    /// Line and column, from 1, when the error has a place in the text.
    pub position: Option<(usize, usize)>,
    /// What is wrong, in words; never holds a secret.
    pub message: String,
}

impl ConfigError {
    fn render(&self) -> String {
        let mut s = self.file.clone();
        if let Some((line, col)) = self.position {
            s.push_str(&format!(":{line}:{col}"));
        }
        s.push_str(": ");
        if let Some(key) = &self.key {
            s.push_str(key);
            s.push_str(": ");
        }
        s.push_str(&self.message);
        s
    }
}

/// Where a credential comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialSource {
    /// A file path given in the config.
    File(PathBuf),
    /// `credential:NAME`, read from `$CREDENTIALS_DIRECTORY/NAME`.
    SystemdCredential(String),
}

impl CredentialSource {
    /// The file to read, resolving `credential:NAME` against `$CREDENTIALS_DIRECTORY`.
    pub fn path(&self) -> Result<PathBuf, String> {
        match self {
            CredentialSource::File(p) => Ok(p.clone()),
            CredentialSource::SystemdCredential(name) => {
                let dir = std::env::var_os("CREDENTIALS_DIRECTORY")
                    .ok_or_else(|| format!("credential:{name} needs $CREDENTIALS_DIRECTORY, which is not set"))?;
                Ok(PathBuf::from(dir).join(name))
            }
        }
    }

    /// A description for messages (the path or `credential:NAME`), never the content.
    pub fn describe(&self) -> String {
        match self {
            CredentialSource::File(p) => p.display().to_string(),
            CredentialSource::SystemdCredential(n) => format!("credential:{n}"),
        }
    }
}

/// The app backend that signs authorization requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// `POST` target of signing requests.
    pub url: reqwest::Url,
    /// Default credential of sessions without their own.
    pub token_file: Option<CredentialSource>,
}

/// The `[refresh]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct RefreshConfig {
    /// Re-authorize when less than this remains.
    pub margin: Duration,
    /// Refresh up to this much earlier, at random, per cycle.
    pub jitter: Duration,
    /// The periodic wall-clock sweep, six cron fields, UTC.
    pub check_schedule: String,
    /// First retry delay after a transient failure.
    pub backoff_initial: Duration,
    /// Cap of the exponential backoff.
    pub backoff_max: Duration,
}

/// The `[rate_limit]` table: successful logins per `unique_user_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// In any 60 s.
    pub logins_per_minute: u32,
    /// In any 24 h.
    pub logins_per_day: u32,
    /// The last this many logins of the daily budget are kept for the daemon's own refreshes:
    /// client calls that need a login fail with `TooManyRequests` when no more remain. Always
    /// less than `logins_per_day`; by default a tenth of it, rounded down.
    pub reserved_for_refresh: u32,
    /// Extra (not in SPEC 3): spread automatic refreshes of short-lived tokens so the daily
    /// budget lasts the day. Off by default, because it delays refreshes past the SPEC's
    /// `refresh_at` even while the budget still allows them.
    pub pace: bool,
}

/// The `[notify]` table: desktop notifications.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotifyConfig {
    /// Send a desktop notification when a session needs re-authorization.
    pub enabled: bool,
}

/// The `[sandbox]` table (SPEC section 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SandboxConfig {
    /// The daemon confines itself with Landlock; `false` runs it unconfined (for debugging,
    /// or a system where the confinement gets in the way).
    pub enabled: bool,
}

/// The `[access]` table: which programs may read tokens.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AccessConfig {
    /// When set, only these executables (absolute paths, as `/proc/PID/exe` shows them) may
    /// call `GetToken` and `EnsureValid`; other methods stay open to the user's programs.
    pub token_executables: Option<Vec<PathBuf>>,
}

/// One configured session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    /// `[a-z0-9_-]{1,64}`.
    pub id: String,
    /// Who the user is.
    pub profile: crate::profile::Profile,
    /// Overrides `[backend].token_file`.
    pub backend_token_file: Option<CredentialSource>,
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file the config was read from (or what `parse` was told), so that errors found
    /// later, by [`check_state_dir`] or [`check_credentials`], can name it.
    pub file: String,
    /// Overrides the state directory; always an absolute path.
    pub state_dir: Option<PathBuf>,
    /// Entrupy base URL; login is `POST {api_url}/login`.
    pub api_url: reqwest::Url,
    /// `None` when there is no `[backend]` table.
    pub backend: Option<BackendConfig>,
    /// Whole-request timeout of every HTTP call.
    pub http_timeout: Duration,
    /// Refresh policy settings.
    pub refresh: RefreshConfig,
    /// Login budget per user.
    pub rate_limit: RateLimitConfig,
    /// Desktop notifications.
    pub notify: NotifyConfig,
    /// Self-confinement.
    pub sandbox: SandboxConfig,
    /// Token access allow-list.
    pub access: AccessConfig,
    /// Configured sessions, in file order, ids unique.
    pub sessions: Vec<SessionConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    state_dir: Option<Spanned<String>>,
    entrupy: Option<RawEntrupy>,
    backend: Option<Spanned<RawBackend>>,
    refresh: Option<RawRefresh>,
    rate_limit: Option<RawRateLimit>,
    notify: Option<RawNotify>,
    sandbox: Option<RawSandbox>,
    access: Option<RawAccess>,
    #[serde(default)]
    session: Vec<Spanned<RawSession>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccess {
    token_executables: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntrupy {
    api_url: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    url: Option<Spanned<String>>,
    token_file: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRefresh {
    margin: Option<Spanned<String>>,
    jitter: Option<Spanned<String>>,
    check_schedule: Option<Spanned<String>>,
    backoff_initial: Option<Spanned<String>>,
    backoff_max: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    logins_per_minute: Option<Spanned<i64>>,
    logins_per_day: Option<Spanned<i64>>,
    reserved_for_refresh: Option<Spanned<i64>>,
    pace: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    enabled: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSandbox {
    enabled: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSession {
    id: Option<Spanned<String>>,
    unique_user_id: Option<Spanned<String>>,
    email: Option<Spanned<String>>,
    first_name: Option<Spanned<String>>,
    last_name: Option<Spanned<String>>,
    backend_token_file: Option<Spanned<String>>,
}

/// Turns byte offsets into 1-based line and column (in characters).
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let col = before.get(line_start..).map(|s| s.chars().count()).unwrap_or(0) + 1;
    (line, col)
}

struct Ctx<'a> {
    file: &'a str,
    text: &'a str,
}

impl Ctx<'_> {
    fn err_at(&self, key: &str, span: Option<std::ops::Range<usize>>, msg: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_owned(),
            key: Some(key.to_owned()),
            position: span.map(|s| line_col(self.text, s.start)),
            message: msg.into(),
        }
    }

    fn duration(&self, key: &str, v: Option<&Spanned<String>>, default: Duration) -> Result<Duration, ConfigError> {
        match v {
            None => Ok(default),
            Some(s) => parse_duration(s.get_ref()).map_err(|m| self.err_at(key, Some(s.span()), m)),
        }
    }

    /// A syntax, type or unknown-key error from the TOML parser, with the dotted key it is
    /// about and its place, and its message in words.
    fn deserialize_error(&self, e: &toml::de::Error) -> ConfigError {
        let raw = e.message().trim();
        let offset = e.span().map(|s| s.start);
        let key = match (unknown_key_name(raw), offset) {
            (Some(k), Some(o)) => Some(match parent_at(self.text, o) {
                Some(t) => format!("{t}.{k}"),
                None => k,
            }),
            (Some(k), None) => Some(k),
            (None, Some(o)) => key_at(self.text, o),
            (None, None) => None,
        };
        let found_text = e.span().and_then(|s| self.text.get(s));
        ConfigError {
            file: self.file.to_owned(),
            key,
            position: offset.map(|o| line_col(self.text, o)),
            message: humanize_type_error(raw, found_text).unwrap_or_else(|| raw.to_owned()),
        }
    }

    fn url(&self, key: &str, s: &Spanned<String>) -> Result<reqwest::Url, ConfigError> {
        validate_url(s.get_ref()).map_err(|m| self.err_at(key, Some(s.span()), m))
    }

    fn credential(&self, key: &str, s: &Spanned<String>) -> Result<CredentialSource, ConfigError> {
        parse_credential_source(s.get_ref()).map_err(|m| self.err_at(key, Some(s.span()), m))
    }
}

/// Parses a duration in the usual human form (`500ms`, `90s`, `5m`, `1m30s`, `1h`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration; use a form like 90s, 5m or 1m30s".to_owned());
    }
    humantime::parse_duration(t).map_err(|e| format!("invalid duration {t:?}: {e}; use a form like 90s, 5m or 1m30s"))
}

/// Checks that a URL is `https://`, or `http://` on a loopback host.
pub fn validate_url(s: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(s).map_err(|e| format!("invalid URL {s:?}: {e}"))?;
    match url.scheme() {
        "https" => {}
        "http" => {
            if !is_loopback_host(&url) {
                return Err(format!(
                    "{s:?} uses http://, which is allowed only for loopback hosts (127.0.0.0/8, ::1, localhost); use https://"
                ));
            }
        }
        other => return Err(format!("{s:?} has scheme {other:?}; use https://")),
    }
    if url.host().is_none() {
        return Err(format!("{s:?} has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("URLs must not carry credentials; use a token file".to_owned());
    }
    Ok(url)
}

fn is_loopback_host(url: &reqwest::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

/// Parses a credential path: a file path, or `credential:NAME`.
pub fn parse_credential_source(s: &str) -> Result<CredentialSource, String> {
    if let Some(name) = s.strip_prefix("credential:") {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(format!("invalid credential name {name:?}: a plain file name is needed"));
        }
        return Ok(CredentialSource::SystemdCredential(name.to_owned()));
    }
    if s.is_empty() {
        return Err("empty path".to_owned());
    }
    Ok(CredentialSource::File(PathBuf::from(s)))
}

/// Whether `id` is a valid session id: `[a-z0-9_-]{1,64}`.
pub fn validate_session_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 {
        return Err(format!("session id must be 1 to 64 characters, got {}", id.len()));
    }
    if let Some(c) = id.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_' || *c == '-')) {
        return Err(format!("session id {id:?} has {c:?}; allowed are a-z, 0-9, _ and -"));
    }
    Ok(())
}

/// Whether `uid` is a valid `unique_user_id`: 8-40 chars of `A-Za-z0-9@.+_-`.
pub fn validate_unique_user_id(uid: &str) -> Result<(), String> {
    let n = uid.chars().count();
    if !(8..=40).contains(&n) {
        return Err(format!("unique_user_id must be 8 to 40 characters, got {n}"));
    }
    if let Some(c) = uid.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '@' | '.' | '+' | '_' | '-'))) {
        return Err(format!("unique_user_id has {c:?}; allowed are A-Z, a-z, 0-9 and @ . + _ -"));
    }
    Ok(())
}

/// A plausibility check of an e-mail address: one `@` with text on both sides, no spaces or
/// control characters, at most 254 bytes.
pub fn validate_email(email: &str) -> Result<(), String> {
    if email.is_empty() || email.len() > 254 {
        return Err(format!("email must be 1 to 254 bytes, got {}", email.len()));
    }
    if email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("email must not contain spaces or control characters".to_owned());
    }
    match email.split_once('@') {
        Some((local, domain)) if !local.is_empty() && !domain.is_empty() && !domain.contains('@') => Ok(()),
        _ => Err(format!("{email:?} is not an e-mail address (local@domain)")),
    }
}

/// Checks a first or last name: at most 256 bytes, no control characters.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.len() > 256 {
        return Err(format!("name is longer than 256 bytes ({})", name.len()));
    }
    if name.chars().any(|c| c.is_control()) {
        return Err("name must not contain control characters".to_owned());
    }
    Ok(())
}

/// The six fields of `check_schedule`, in order, with the values each allows.
const CRON_FIELDS: [(&str, &str); 6] = [
    ("seconds", "0-59"),
    ("minutes", "0-59"),
    ("hours", "0-23"),
    ("day-of-month", "1-31"),
    ("month", "1-12 or JAN-DEC"),
    ("day-of-week", "0-7 or SUN-SAT (0 and 7 are Sunday)"),
];

fn cron_parser() -> croner::parser::CronParser {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .year(croner::parser::Year::Disallowed)
        .build()
}

/// Parses a six-field cron schedule (seconds first), as `check_schedule` takes it. An error
/// names the field at fault and the values it allows.
pub fn parse_schedule(s: &str) -> Result<croner::Cron, String> {
    let fields: Vec<&str> = s.split_whitespace().collect();
    if fields.len() != 6 {
        return Err(format!(
            "{s:?} has {} fields; six are needed (sec min hour day-of-month month day-of-week)",
            fields.len()
        ));
    }
    cron_parser().parse(s).map_err(|e| describe_cron_error(s, &fields, &e))
}

/// croner says what is wrong but not where: parse each field alone (the others `*`) to find
/// the first one at fault. An error only the combination has keeps croner's words.
fn describe_cron_error(s: &str, fields: &[&str], whole: &croner::errors::CronError) -> String {
    for (i, ((name, allowed), field)) in CRON_FIELDS.iter().zip(fields).enumerate() {
        let mut alone = ["*"; 6];
        if let Some(slot) = alone.get_mut(i) {
            *slot = field;
        }
        if let Err(e) = cron_parser().parse(&alone.join(" ")) {
            let reason = cron_reason(&e);
            let what = if reason.contains("out of bounds") { "is out of range" } else { "is invalid" };
            return format!(
                "invalid cron schedule {s:?}: the {name} field (field {}) {field:?} {what} ({reason}); allowed: {allowed}",
                i + 1
            );
        }
    }
    format!("invalid cron schedule {s:?}: {}", cron_reason(whole))
}

/// croner's message without its category prefix and final full stop.
fn cron_reason(e: &croner::errors::CronError) -> String {
    let text = match e {
        croner::errors::CronError::ComponentError(m) | croner::errors::CronError::InvalidPattern(m) => m.clone(),
        other => other.to_string(),
    };
    text.trim_end_matches('.').to_owned()
}

fn positive_u32(ctx: &Ctx<'_>, key: &str, v: Option<&Spanned<i64>>, default: u32) -> Result<u32, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) => {
            let n = *s.get_ref();
            u32::try_from(n).ok().filter(|n| *n >= 1).ok_or_else(|| {
                ctx.err_at(key, Some(s.span()), format!("must be a whole number from 1 to {}, got {n}", u32::MAX))
            })
        }
    }
}

/// Parses and validates a config text. `file` names the source in error messages. Pure: it
/// reads no file (credential files are checked by [`check_credentials`], the state directory
/// by [`check_state_dir`]).
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
    let ctx = Ctx { file, text };
    let raw: RawConfig = toml::from_str(text).map_err(|e| ctx.deserialize_error(&e))?;
    let state_dir = parse_state_dir(&ctx, raw.state_dir.as_ref())?;
    let api_url = match raw.entrupy.as_ref().and_then(|e| e.api_url.as_ref()) {
        None => validate_url(DEFAULT_API_URL).map_err(|m| ctx.err_at("entrupy.api_url", None, m))?,
        Some(s) => ctx.url("entrupy.api_url", s)?,
    };
    let (backend, http_timeout) = match &raw.backend {
        None => (None, DEFAULT_HTTP_TIMEOUT),
        Some(b) => parse_backend(&ctx, b).map(|(b, t)| (Some(b), t))?,
    };
    let refresh = parse_refresh(&ctx, raw.refresh.as_ref())?;
    let rate_limit = parse_rate_limit(&ctx, raw.rate_limit.as_ref())?;
    let access = parse_access(&ctx, raw.access.as_ref())?;
    let sessions = parse_sessions(&ctx, &raw.session)?;
    Ok(Config {
        file: file.to_owned(),
        state_dir,
        api_url,
        backend,
        http_timeout,
        refresh,
        rate_limit,
        notify: NotifyConfig { enabled: raw.notify.as_ref().and_then(|n| n.enabled).unwrap_or(true) },
        sandbox: SandboxConfig { enabled: raw.sandbox.as_ref().and_then(|s| s.enabled).unwrap_or(true) },
        access,
        sessions,
    })
}

/// `[backend] timeout` when not given (and when there is no `[backend]` table).
const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(15);

fn parse_state_dir(ctx: &Ctx<'_>, v: Option<&Spanned<String>>) -> Result<Option<PathBuf>, ConfigError> {
    let Some(s) = v else { return Ok(None) };
    if s.get_ref().is_empty() {
        return Err(ctx.err_at("state_dir", Some(s.span()), "empty path"));
    }
    let dir = PathBuf::from(s.get_ref());
    if !dir.is_absolute() {
        let msg = format!("{:?} is not an absolute path; give the full path, starting with /", s.get_ref());
        return Err(ctx.err_at("state_dir", Some(s.span()), msg));
    }
    Ok(Some(dir))
}

/// The `[backend]` table and the HTTP timeout it holds.
fn parse_backend(ctx: &Ctx<'_>, b: &Spanned<RawBackend>) -> Result<(BackendConfig, Duration), ConfigError> {
    let span = b.span();
    let b = b.get_ref();
    let http_timeout = ctx.duration("backend.timeout", b.timeout.as_ref(), DEFAULT_HTTP_TIMEOUT)?;
    if http_timeout.is_zero() {
        return Err(ctx.err_at("backend.timeout", b.timeout.as_ref().map(|s| s.span()), "must be more than 0"));
    }
    let url = match &b.url {
        None => {
            return Err(ctx.err_at(
                "backend.url",
                Some(span),
                "the [backend] table needs a url (leave the table out to log in only with signed requests)",
            ));
        }
        Some(u) => ctx.url("backend.url", u)?,
    };
    let token_file = b.token_file.as_ref().map(|t| ctx.credential("backend.token_file", t)).transpose()?;
    Ok((BackendConfig { url, token_file }, http_timeout))
}

fn parse_refresh(ctx: &Ctx<'_>, r: Option<&RawRefresh>) -> Result<RefreshConfig, ConfigError> {
    let margin = ctx.duration("refresh.margin", r.and_then(|r| r.margin.as_ref()), Duration::from_secs(300))?;
    let jitter = ctx.duration("refresh.jitter", r.and_then(|r| r.jitter.as_ref()), Duration::from_secs(30))?;
    let initial = r.and_then(|r| r.backoff_initial.as_ref());
    let backoff_initial = ctx.duration("refresh.backoff_initial", initial, Duration::from_secs(2))?;
    let max = r.and_then(|r| r.backoff_max.as_ref());
    let backoff_max = ctx.duration("refresh.backoff_max", max, Duration::from_secs(300))?;
    if backoff_initial.is_zero() {
        return Err(ctx.err_at("refresh.backoff_initial", initial.map(|s| s.span()), "must be more than 0"));
    }
    if backoff_max < backoff_initial {
        let msg = "must not be less than refresh.backoff_initial";
        return Err(ctx.err_at("refresh.backoff_max", max.map(|s| s.span()), msg));
    }
    let check_schedule = match r.and_then(|r| r.check_schedule.as_ref()) {
        None => "0 * * * * *".to_owned(),
        Some(s) => {
            parse_schedule(s.get_ref()).map_err(|m| ctx.err_at("refresh.check_schedule", Some(s.span()), m))?;
            s.get_ref().clone()
        }
    };
    Ok(RefreshConfig { margin, jitter, check_schedule, backoff_initial, backoff_max })
}

fn parse_rate_limit(ctx: &Ctx<'_>, rl: Option<&RawRateLimit>) -> Result<RateLimitConfig, ConfigError> {
    let per_minute = rl.and_then(|r| r.logins_per_minute.as_ref());
    let logins_per_minute = positive_u32(ctx, "rate_limit.logins_per_minute", per_minute, 5)?;
    let per_day = rl.and_then(|r| r.logins_per_day.as_ref());
    let logins_per_day = positive_u32(ctx, "rate_limit.logins_per_day", per_day, 100)?;
    let reserved_for_refresh = match rl.and_then(|r| r.reserved_for_refresh.as_ref()) {
        None => logins_per_day / 10,
        Some(s) => {
            let n = *s.get_ref();
            u32::try_from(n).ok().filter(|n| *n < logins_per_day).ok_or_else(|| {
                let msg = format!(
                    "must be a whole number from 0 to {}, less than rate_limit.logins_per_day ({logins_per_day}), got {n}",
                    logins_per_day - 1
                );
                ctx.err_at("rate_limit.reserved_for_refresh", Some(s.span()), msg)
            })?
        }
    };
    let pace = rl.and_then(|r| r.pace).unwrap_or(false);
    Ok(RateLimitConfig { logins_per_minute, logins_per_day, reserved_for_refresh, pace })
}

fn parse_access(ctx: &Ctx<'_>, a: Option<&RawAccess>) -> Result<AccessConfig, ConfigError> {
    let Some(list) = a.and_then(|a| a.token_executables.as_ref()) else { return Ok(AccessConfig::default()) };
    let mut out = Vec::new();
    for p in list.get_ref() {
        if !p.starts_with('/') {
            let msg = format!("{p:?} is not an absolute path");
            return Err(ctx.err_at("access.token_executables", Some(list.span()), msg));
        }
        out.push(PathBuf::from(p));
    }
    Ok(AccessConfig { token_executables: Some(out) })
}

fn parse_sessions(ctx: &Ctx<'_>, raw: &[Spanned<RawSession>]) -> Result<Vec<SessionConfig>, ConfigError> {
    let mut sessions: Vec<SessionConfig> = Vec::with_capacity(raw.len());
    for (i, s) in raw.iter().enumerate() {
        let session = parse_session(ctx, i, s)?;
        if sessions.iter().any(|o| o.id == session.id) {
            let span = s.get_ref().id.as_ref().map(|id| id.span());
            let msg = format!("duplicate session id {:?}", session.id);
            return Err(ctx.err_at(&format!("session[{i}].id"), span, msg));
        }
        sessions.push(session);
    }
    Ok(sessions)
}

/// The `i`th `[[session]]` (from 0), on its own; [`parse_sessions`] checks the ids are unique.
fn parse_session(ctx: &Ctx<'_>, i: usize, s: &Spanned<RawSession>) -> Result<SessionConfig, ConfigError> {
    let span = s.span();
    let s = s.get_ref();
    let key = |k: &str| format!("session[{i}].{k}");
    let required = |v: &Option<Spanned<String>>, k: &str| -> Result<Spanned<String>, ConfigError> {
        v.clone()
            .ok_or_else(|| ctx.err_at(&key(k), Some(span.clone()), format!("missing; every [[session]] needs {k}")))
    };
    let checked = |v: Spanned<String>, k: &str, check: fn(&str) -> Result<(), String>| {
        check(v.get_ref()).map_err(|m| ctx.err_at(&key(k), Some(v.span()), m)).map(|()| v.into_inner())
    };
    let id = checked(required(&s.id, "id")?, "id", validate_session_id)?;
    let unique_user_id =
        checked(required(&s.unique_user_id, "unique_user_id")?, "unique_user_id", validate_unique_user_id)?;
    let email = checked(required(&s.email, "email")?, "email", validate_email)?;
    let first_name = s.first_name.clone().map(|n| checked(n, "first_name", validate_name)).transpose()?;
    let last_name = s.last_name.clone().map(|n| checked(n, "last_name", validate_name)).transpose()?;
    let backend_token_file =
        s.backend_token_file.as_ref().map(|t| ctx.credential(&key("backend_token_file"), t)).transpose()?;
    let profile = crate::profile::Profile { unique_user_id, email, first_name, last_name };
    Ok(SessionConfig { id, profile, backend_token_file })
}

/// The table a byte offset is in, as a dotted name (`refresh`, `session[1]`), from the last
/// header above it; `None` at the top level.
fn table_at(text: &str, offset: usize) -> Option<String> {
    let before = text.get(..offset.min(text.len()))?;
    let mut table = None;
    let mut counts: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for line in before.lines() {
        let t = line.split('#').next().unwrap_or("").trim();
        if let Some(name) = t.strip_prefix("[[").and_then(|r| r.strip_suffix("]]")) {
            let name = name.trim().to_owned();
            let n = counts.entry(name.clone()).or_insert(0);
            table = Some(format!("{name}[{n}]"));
            *n += 1;
        } else if let Some(name) = t.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            table = Some(name.trim().to_owned());
        }
    }
    table
}

/// The dotted key of the `key = value` line at a byte offset (for syntax and type errors),
/// or the table when the line is a header.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let line_start = text.get(..offset)?.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line_end = text.get(offset..).and_then(|r| r.find('\n')).map(|i| offset + i).unwrap_or(text.len());
    let line = text.get(line_start..line_end)?.trim();
    let table = table_at(text, line_start);
    match line.split_once('=') {
        Some((k, _)) if !line.starts_with('[') => {
            let k = k.trim().trim_matches('"');
            if k.is_empty() {
                return table;
            }
            Some(match table {
                Some(t) => format!("{t}.{k}"),
                None => k.to_owned(),
            })
        }
        _ => table,
    }
}

/// Pulls the key name out of serde's "unknown field `x`" message.
fn unknown_key_name(message: &str) -> Option<String> {
    let rest = message.split("unknown field `").nth(1)?;
    Some(rest.split('`').next()?.to_owned())
}

/// The table an unknown key at a byte offset belongs to. In a header (`[refesh]`,
/// `[[sessio]]`, `[refresh.extra]`) that is what the header names before the key, not the
/// table above it: `[refesh]` is the top-level key `refesh`. Elsewhere it is [`table_at`].
fn parent_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let line_start = text.get(..offset)?.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let before = text.get(line_start..offset)?.trim_start();
    if !before.starts_with('[') {
        return table_at(text, offset);
    }
    let path = before.trim_start_matches('[').trim().trim_end_matches('.').trim();
    if path.is_empty() { None } else { Some(path.replace(['"', '\'', ' '], "")) }
}

/// serde's type errors ("invalid type: string \"five\", expected i64") in words ("expected an
/// integer, found the string \"five\""). `found_text` is the value's text in the file, which
/// tells a date from a table. `None` for other messages.
fn humanize_type_error(message: &str, found_text: Option<&str>) -> Option<String> {
    let rest = message.strip_prefix("invalid type: ").or_else(|| message.strip_prefix("invalid value: "))?;
    let (found, expected) = rest.rsplit_once(", expected ")?;
    let expected = match expected.trim() {
        "i8" | "i16" | "i32" | "i64" | "i128" | "u8" | "u16" | "u32" | "u64" | "u128" | "isize" | "usize" => {
            "an integer"
        }
        "f32" | "f64" => "a number",
        "a string" | "a borrowed string" | "a char" => "a string",
        "a boolean" => "a boolean (true or false)",
        "a sequence" => "an array",
        "a map" => "a table",
        e if e.starts_with("struct ") => "a table",
        _ => return None,
    };
    let value = |s: &str| s.trim_matches('`').to_owned();
    let found = match found.split_once(' ') {
        _ if found == "map" => match found_text.map(str::trim_start) {
            Some(t) if !t.starts_with('{') && !t.starts_with('[') => "a date or time".to_owned(),
            _ => "a table".to_owned(),
        },
        _ if found == "sequence" => "an array".to_owned(),
        Some(("integer", v)) if v.ends_with(" as i128") || v.ends_with(" as u128") => {
            format!(
                "the integer {}, which is too large",
                value(v.trim_end_matches(" as i128").trim_end_matches(" as u128"))
            )
        }
        Some(("integer", v)) => format!("the integer {}", value(v)),
        Some(("floating", v)) => format!("the number {}", value(v.trim_start_matches("point "))),
        Some(("boolean", v)) => format!("the boolean {}", value(v)),
        Some(("string", v)) => format!("the string {v}"),
        _ => found.to_owned(),
    };
    Some(format!("expected {expected}, found {found}"))
}

impl Config {
    /// The credential source of a configured session: its own, else the backend's default.
    pub fn credential_for(&self, session: &SessionConfig) -> Option<CredentialSource> {
        session.backend_token_file.clone().or_else(|| self.backend.as_ref().and_then(|b| b.token_file.clone()))
    }

    /// The parsed sweep schedule (validated by [`parse`], so this only fails for a config
    /// built by hand).
    pub fn schedule(&self) -> Result<croner::Cron, String> {
        parse_schedule(&self.refresh.check_schedule)
    }
}

/// Checks every credential file the config names by reading it as the daemon will
/// ([`crate::credential::read`]): a file that is missing, unreadable, not regular, not the
/// user's, too open, too large or malformed is an error naming the key and the file.
pub fn check_credentials(config: &Config, file: &str) -> Result<(), ConfigError> {
    let mut checks: Vec<(String, CredentialSource)> = Vec::new();
    if let Some(t) = config.backend.as_ref().and_then(|b| b.token_file.clone()) {
        checks.push(("backend.token_file".to_owned(), t));
    }
    for (i, s) in config.sessions.iter().enumerate() {
        if let Some(t) = &s.backend_token_file {
            checks.push((format!("session[{i}].backend_token_file"), t.clone()));
        }
    }
    for (key, src) in checks {
        crate::credential::read(&src).map_err(|e| ConfigError {
            file: file.to_owned(),
            key: Some(key),
            position: None,
            message: e.to_string(),
        })?;
    }
    Ok(())
}

/// Checks one credential file by reading it ([`crate::credential::read`], whose rules it
/// applies) and returns the path it resolves to; the message names the file, never the
/// content. Callers that need the credential call [`crate::credential::read`] directly.
pub fn check_credential_file(src: &CredentialSource) -> Result<PathBuf, String> {
    crate::credential::read(src).map_err(|e| e.to_string())?;
    src.path()
}

/// Where the config comes from and whether it must exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigLocation {
    /// The file.
    pub path: PathBuf,
    /// True when named by `--config` or `$ENTRUPY_TOKEND_CONFIG`: then it must exist.
    pub explicit: bool,
}

/// Resolves the config path: `--config`, else `$ENTRUPY_TOKEND_CONFIG`, else
/// `$XDG_CONFIG_HOME/entrupy-tokend/config.toml` (`~/.config/...`).
pub fn locate(cli: Option<&Path>) -> Result<ConfigLocation, String> {
    if let Some(p) = cli {
        return Ok(ConfigLocation { path: p.to_owned(), explicit: true });
    }
    if let Some(p) = std::env::var_os("ENTRUPY_TOKEND_CONFIG").filter(|p| !p.is_empty()) {
        return Ok(ConfigLocation { path: PathBuf::from(p), explicit: true });
    }
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => home_dir("XDG_CONFIG_HOME")?.join(".config"),
    };
    Ok(ConfigLocation { path: base.join("entrupy-tokend").join("config.toml"), explicit: false })
}

/// `$HOME`, which stands in for the XDG variable `xdg` when that is not set.
fn home_dir(xdg: &str) -> Result<PathBuf, String> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| format!("neither ${xdg} nor $HOME is set"))
}

/// Reads, parses and checks the config at `loc`. A missing default file is the empty config.
pub fn load(loc: &ConfigLocation) -> Result<Config, ConfigError> {
    let file = loc.path.display().to_string();
    let text = match std::fs::read(&loc.path) {
        Ok(bytes) => String::from_utf8(bytes).map_err(|e| ConfigError {
            file: file.clone(),
            key: None,
            position: {
                let valid = e.utf8_error().valid_up_to();
                let prefix = String::from_utf8_lossy(e.as_bytes().get(..valid).unwrap_or_default()).into_owned();
                Some(line_col(&prefix, valid))
            },
            message: "the file is not valid UTF-8".to_owned(),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !loc.explicit => String::new(),
        Err(e) => {
            return Err(ConfigError { file, key: None, position: None, message: format!("cannot read: {e}") });
        }
    };
    let config = parse(&text, &file)?;
    check_credentials(&config, &file)?;
    Ok(config)
}

/// Where the state directory came from, for messages.
enum StateDirOrigin {
    /// The `state_dir` key.
    Key,
    /// An environment variable, or `$HOME`; the text names it.
    Env(&'static str),
}

/// Resolves the state directory: config `state_dir`, else `$STATE_DIRECTORY`, else
/// `$XDG_STATE_HOME/entrupy-tokend` (`~/.local/state/...`).
pub fn state_dir(config: &Config) -> Result<PathBuf, String> {
    resolve_state_dir(config).map(|(dir, _)| dir)
}

fn resolve_state_dir(config: &Config) -> Result<(PathBuf, StateDirOrigin), String> {
    if let Some(d) = &config.state_dir {
        return Ok((d.clone(), StateDirOrigin::Key));
    }
    if let Some(d) = std::env::var_os("STATE_DIRECTORY").filter(|d| !d.is_empty()) {
        // systemd may pass several colon-separated directories; the first is ours.
        let s = PathBuf::from(d);
        let first = s.to_string_lossy().split(':').next().map(PathBuf::from).unwrap_or(s);
        return Ok((first, StateDirOrigin::Env("$STATE_DIRECTORY")));
    }
    match std::env::var_os("XDG_STATE_HOME").filter(|p| !p.is_empty()) {
        Some(p) => Ok((PathBuf::from(p).join("entrupy-tokend"), StateDirOrigin::Env("$XDG_STATE_HOME"))),
        None => {
            let dir = home_dir("XDG_STATE_HOME")?.join(".local").join("state").join("entrupy-tokend");
            Ok((dir, StateDirOrigin::Env("$HOME")))
        }
    }
}

/// Resolves the state directory as [`state_dir`] does, creates it (mode 0700, and its
/// missing parents) if missing, and checks that it is a directory the daemon can write, by
/// creating and removing a file in it. Any failure is a configuration error (SPEC 2: exit
/// 78) that names the config file and, when the directory comes from the config, the
/// `state_dir` key. Blocking.
pub fn check_state_dir(config: &Config) -> Result<PathBuf, ConfigError> {
    let (dir, origin) = resolve_state_dir(config).map_err(|m| ConfigError {
        file: config.file.clone(),
        key: None,
        position: None,
        message: format!("cannot find the state directory: {m}"),
    })?;
    let (key, from) = match origin {
        StateDirOrigin::Key => (Some("state_dir".to_owned()), String::new()),
        StateDirOrigin::Env(var) => (None, format!(" (from {var})")),
    };
    let fail = |what: String| ConfigError {
        file: config.file.clone(),
        key: key.clone(),
        position: None,
        message: format!("state directory {}{from} {what}", dir.display()),
    };
    if !dir.is_absolute() {
        return Err(fail("is not an absolute path".to_owned()));
    }
    if let Err(e) = create_private_dir(&dir) {
        return Err(fail(format!("cannot be created: {e}")));
    }
    match std::fs::metadata(&dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(fail("is not a directory".to_owned())),
        Err(e) => return Err(fail(format!("cannot be read: {e}"))),
    }
    probe_writable(&dir).map_err(|e| fail(format!("is not writable: {e}")))?;
    Ok(dir)
}

/// Creates `dir` and its missing parents with mode 0700; an existing directory is left as it
/// is. A path that exists but is not a directory is reported by the caller's own check.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

/// Creates and removes a private file in `dir`.
fn probe_writable(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos());
    let probe = dir.join(format!(".write-check.{}.{}", std::process::id(), nanos.unwrap_or(0)));
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&probe)?;
    std::fs::remove_file(&probe)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> ConfigError {
        match parse(text, "test.toml") {
            Ok(_) => panic!("expected an error for {text:?}"),
            Err(e) => e,
        }
    }

    const FULL: &str = r#"
state_dir = "/tmp/st"
[entrupy]
api_url = "http://127.0.0.1:8080"
[backend]
url = "https://app.example.com/entrupy/sign"
token_file = "credential:app"
timeout = "5s"
[refresh]
margin = "1m30s"
jitter = "500ms"
check_schedule = "*/10 * * * * *"
backoff_initial = "1s"
backoff_max = "1h"
[rate_limit]
logins_per_minute = 3
logins_per_day = 50
[[session]]
id = "default"
unique_user_id = "example-user-0001"
email = "user@example.com"
first_name = "Ada"
last_name = "Lovelace"
backend_token_file = "/path"
[[session]]
id = "second_2"
unique_user_id = "example-user-0001"
email = "other@example.com"
"#;

    #[test]
    fn empty_config_has_the_documented_defaults() {
        let c = parse("", "x").unwrap();
        assert_eq!(c.api_url.as_str(), "https://api.entrupy.com/");
        assert_eq!(c.backend, None);
        assert_eq!(c.http_timeout, Duration::from_secs(15));
        assert_eq!(c.refresh.margin, Duration::from_secs(300));
        assert_eq!(c.refresh.jitter, Duration::from_secs(30));
        assert_eq!(c.refresh.check_schedule, "0 * * * * *");
        assert_eq!(c.refresh.backoff_initial, Duration::from_secs(2));
        assert_eq!(c.refresh.backoff_max, Duration::from_secs(300));
        assert_eq!(
            c.rate_limit,
            RateLimitConfig { logins_per_minute: 5, logins_per_day: 100, reserved_for_refresh: 10, pace: false }
        );
        assert!(c.sessions.is_empty());
        assert!(c.notify.enabled);
        assert!(c.sandbox.enabled);
        assert_eq!(c.file, "x");
        assert_eq!(c.access.token_executables, None);
    }

    #[test]
    fn access_and_notify_tables() {
        let c = parse("[notify]\nenabled = false\n[access]\ntoken_executables = [\"/usr/bin/app\"]\n", "x").unwrap();
        assert!(!c.notify.enabled);
        assert_eq!(c.access.token_executables, Some(vec![PathBuf::from("/usr/bin/app")]));
        let e = err("[access]\ntoken_executables = [\"app\"]\n");
        assert_eq!(e.key.as_deref(), Some("access.token_executables"));
    }

    #[test]
    fn full_config_parses() {
        let c = parse(FULL, "x").unwrap();
        assert_eq!(c.state_dir, Some(PathBuf::from("/tmp/st")));
        assert_eq!(c.api_url.as_str(), "http://127.0.0.1:8080/");
        let b = c.backend.clone().unwrap();
        assert_eq!(b.token_file, Some(CredentialSource::SystemdCredential("app".into())));
        assert_eq!(c.http_timeout, Duration::from_secs(5));
        assert_eq!(c.refresh.margin, Duration::from_secs(90));
        assert_eq!(c.refresh.jitter, Duration::from_millis(500));
        assert_eq!(c.refresh.backoff_max, Duration::from_secs(3600));
        assert_eq!(c.rate_limit.logins_per_day, 50);
        assert_eq!(c.sessions.len(), 2);
        assert_eq!(c.sessions[0].profile.first_name.as_deref(), Some("Ada"));
        assert_eq!(c.credential_for(&c.sessions[0]), Some(CredentialSource::File("/path".into())));
        assert_eq!(c.credential_for(&c.sessions[1]), Some(CredentialSource::SystemdCredential("app".into())));
    }

    #[test]
    fn syntax_errors_give_line_and_column() {
        let e = err("[refresh]\nmargin = \"5m\"\njitter = = 3\n");
        assert_eq!(e.position.map(|p| p.0), Some(3), "{e}");
        let text = e.to_string();
        assert!(text.starts_with("test.toml:3:"), "{text}");
    }

    #[test]
    fn every_syntax_and_type_error_names_the_dotted_key() {
        let table: &[(&str, &str)] = &[
            ("[refresh]\nmargin = 5m\n", "refresh.margin"),
            ("[refresh]\nmargin = \"5m\"\nmargin = \"6m\"\n", "refresh.margin"),
            ("[rate_limit]\nlogins_per_minute = 99999999999999999999\n", "rate_limit.logins_per_minute"),
            ("[rate_limit]\nlogins_per_minute = \"five\"\n", "rate_limit.logins_per_minute"),
            ("[[session]]\nid = \"a\"\n[[session]]\nid = 5\n", "session[1].id"),
            ("state_dir = 5\n", "state_dir"),
        ];
        for (text, key) in table {
            let e = err(text);
            assert_eq!(e.key.as_deref(), Some(*key), "{text:?} gave {e}");
            assert!(e.position.is_some());
        }
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let e = err("[refresh]\nmargn = \"5m\"\n");
        assert_eq!(e.key.as_deref(), Some("refresh.margn"));
        assert_eq!(e.position, Some((2, 1)));
        let e = err("bogus = 1\n");
        assert_eq!(e.key.as_deref(), Some("bogus"));
        let e = err("[[session]]\nid=\"a\"\n[[session]]\nid=\"b\"\nfoo=1\n");
        assert_eq!(e.key.as_deref(), Some("session[1].foo"));
        let e = err("[[session]]\nid=\"a\"\nunique_user_id=\"abcdefgh\"\nemail=\"a@b\"\nfoo=\"x\"\n");
        assert!(e.to_string().contains("foo"), "{e}");
    }

    #[test]
    fn value_errors_name_file_key_and_place() {
        let table: &[(&str, &str)] = &[
            ("[refresh]\nmargin = \"5x\"\n", "refresh.margin"),
            ("[refresh]\njitter = \"\"\n", "refresh.jitter"),
            ("[refresh]\ncheck_schedule = \"* * * * *\"\n", "refresh.check_schedule"),
            ("[refresh]\ncheck_schedule = \"0 * * * * * 2030\"\n", "refresh.check_schedule"),
            ("[refresh]\ncheck_schedule = \"99 * * * * *\"\n", "refresh.check_schedule"),
            ("[refresh]\nbackoff_initial = \"0s\"\n", "refresh.backoff_initial"),
            ("[refresh]\nbackoff_initial = \"10s\"\nbackoff_max = \"5s\"\n", "refresh.backoff_max"),
            ("[entrupy]\napi_url = \"http://api.entrupy.com\"\n", "entrupy.api_url"),
            ("[entrupy]\napi_url = \"ftp://localhost\"\n", "entrupy.api_url"),
            ("[entrupy]\napi_url = \"not a url\"\n", "entrupy.api_url"),
            ("[backend]\ntoken_file = \"/x\"\n", "backend.url"),
            ("[backend]\nurl = \"http://10.0.0.1/sign\"\n", "backend.url"),
            ("[backend]\nurl = \"https://x/sign\"\ntimeout = \"0s\"\n", "backend.timeout"),
            ("[rate_limit]\nlogins_per_minute = 0\n", "rate_limit.logins_per_minute"),
            ("[rate_limit]\nlogins_per_day = -1\n", "rate_limit.logins_per_day"),
            ("[[session]]\nunique_user_id = \"abcdefgh\"\nemail = \"a@b\"\n", "session[0].id"),
            ("[[session]]\nid = \"Bad\"\nunique_user_id = \"abcdefgh\"\nemail = \"a@b\"\n", "session[0].id"),
            ("[[session]]\nid = \"a\"\nunique_user_id = \"short\"\nemail = \"a@b\"\n", "session[0].unique_user_id"),
            ("[[session]]\nid = \"a\"\nunique_user_id = \"abcdefgh!\"\nemail = \"a@b\"\n", "session[0].unique_user_id"),
            ("[[session]]\nid = \"a\"\nunique_user_id = \"abcdefgh\"\nemail = \"nope\"\n", "session[0].email"),
            ("[[session]]\nid = \"a\"\nunique_user_id = \"abcdefgh\"\n", "session[0].email"),
            (
                "[[session]]\nid = \"a\"\nunique_user_id = \"abcdefgh\"\nemail = \"a@b\"\n[[session]]\nid = \"a\"\nunique_user_id = \"abcdefgh\"\nemail = \"a@b\"\n",
                "session[1].id",
            ),
            (
                "[[session]]\nid = \"a\"\nunique_user_id = \"abcdefgh\"\nemail = \"a@b\"\nbackend_token_file = \"credential:\"\n",
                "session[0].backend_token_file",
            ),
        ];
        for (text, key) in table {
            let e = err(text);
            assert_eq!(e.key.as_deref(), Some(*key), "{text:?} gave {e}");
            assert!(e.position.is_some(), "{text:?} gave no position: {e}");
            assert!(e.to_string().starts_with("test.toml:"), "{e}");
        }
    }

    #[test]
    fn a_misspelt_table_is_an_unknown_top_level_key() {
        let table: &[(&str, &str, (usize, usize))] = &[
            ("[backend]\nurl = \"https://x/sign\"\n[refesh]\nmargin = \"5m\"\n", "refesh", (3, 2)),
            ("[rate_limit]\nlogins_per_day = 10\n[[sessio]]\nid = \"a\"\n", "sessio", (3, 3)),
            ("[notify]\n  [ refesh ]\n", "refesh", (2, 5)),
            ("[rate_limit]\n[refresh.extra]\na = 1\n", "refresh.extra", (2, 10)),
            ("[refresh]\nmargn = \"5m\"\n", "refresh.margn", (2, 1)),
            ("[refresh]\nmargin = \"5m\"\n[rate_limit]\nfoo.bar = 1\n", "rate_limit.foo", (4, 1)),
        ];
        for (text, key, pos) in table {
            let e = err(text);
            assert_eq!(e.key.as_deref(), Some(*key), "{text:?} gave {e}");
            assert_eq!(e.position, Some(*pos), "{text:?} gave {e}");
            assert!(e.message.starts_with("unknown field"), "{e}");
        }
    }

    #[test]
    fn type_errors_read_in_words() {
        let table: &[(&str, &str)] = &[
            ("[rate_limit]\nlogins_per_minute = \"five\"\n", "expected an integer, found the string \"five\""),
            ("[rate_limit]\nlogins_per_day = 1.5\n", "expected an integer, found the number 1.5"),
            (
                "[rate_limit]\nlogins_per_day = 99999999999999999999\n",
                "expected an integer, found the integer 99999999999999999999, which is too large",
            ),
            ("[rate_limit]\nlogins_per_day = 2024-01-01\n", "expected an integer, found a date or time"),
            ("[refresh]\nmargin = 5\n", "expected a string, found the integer 5"),
            ("[refresh]\nmargin = [1]\n", "expected a string, found an array"),
            ("[refresh]\nmargin = { a = 1 }\n", "expected a string, found a table"),
            ("state_dir = true\n", "expected a string, found the boolean true"),
            ("[notify]\nenabled = \"yes\"\n", "expected a boolean (true or false), found the string \"yes\""),
            ("[sandbox]\nenabled = 1\n", "expected a boolean (true or false), found the integer 1"),
            ("[access]\ntoken_executables = \"/x\"\n", "expected an array, found the string \"/x\""),
            ("refresh = 5\n", "expected a table, found the integer 5"),
            ("session = 5\n", "expected an array, found the integer 5"),
            ("session = [1]\n", "expected a table, found the integer 1"),
        ];
        for (text, message) in table {
            let e = err(text);
            assert_eq!(e.message, *message, "{text:?} gave {e}");
            assert!(e.key.is_some() && e.position.is_some(), "{e}");
            for word in ["i64", "struct", "sequence", "map"] {
                assert!(!e.message.contains(word), "{text:?} gave {e}");
            }
        }
    }

    #[test]
    fn cron_errors_name_the_field_and_its_range() {
        let table: &[(&str, &str, &str)] = &[
            ("99 * * * * *", "the seconds field (field 1) \"99\" is out of range", "0-59"),
            ("0 60 * * * *", "the minutes field (field 2) \"60\" is out of range", "0-59"),
            ("0 0 24 * * *", "the hours field (field 3) \"24\" is out of range", "0-23"),
            ("0 0 0 0 * *", "the day-of-month field (field 4) \"0\" is out of range", "1-31"),
            ("0 0 0 * 13 *", "the month field (field 5) \"13\" is out of range", "1-12 or JAN-DEC"),
            ("0 0 0 * * 8", "the day-of-week field (field 6) \"8\" is out of range", "0-7 or SUN-SAT"),
            ("1-100 * * * * *", "the seconds field (field 1) \"1-100\" is out of range", "0-59"),
            ("0 */0 * * * *", "the minutes field (field 2) \"*/0\" is invalid", "0-59"),
            ("0 0 x * * *", "the hours field (field 3) \"x\" is invalid", "0-23"),
        ];
        for (schedule, says, range) in table {
            let m = parse_schedule(schedule).unwrap_err();
            assert!(m.contains(says) && m.contains(&format!("allowed: {range}")), "{schedule:?} gave {m}");
            assert!(!m.contains("Component error"), "{m}");
        }
        for ok in ["0 * * * * *", "*/10 * * * * *", "0 30 9 * * MON-FRI", "0 0 0 1 JAN *", "0 0 0 * * 7"] {
            assert!(parse_schedule(ok).is_ok(), "{ok}");
        }
        for fields in ["* * * * *", "0 * * * * * 2030", "", "0"] {
            assert!(parse_schedule(fields).unwrap_err().contains("six are needed"), "{fields:?}");
        }
        let e = err("[refresh]\ncheck_schedule = \"0 0 25 * * *\"\n");
        assert_eq!(e.key.as_deref(), Some("refresh.check_schedule"));
        assert!(e.message.contains("hours field") && e.message.contains("0-23"), "{e}");
    }

    #[test]
    fn state_dir_must_be_absolute() {
        for text in ["state_dir = \"state\"\n", "state_dir = \"./state\"\n", "state_dir = \"~/state\"\n"] {
            let e = err(text);
            assert_eq!(e.key.as_deref(), Some("state_dir"), "{e}");
            assert_eq!(e.position, Some((1, 13)), "{e}");
            assert!(e.message.contains("not an absolute path"), "{e}");
        }
        assert_eq!(parse("state_dir = \"/var/x\"\n", "x").unwrap().state_dir, Some(PathBuf::from("/var/x")));
    }

    #[test]
    fn reserved_for_refresh_defaults_to_a_tenth_and_stays_below_the_day() {
        let rl = |text: &str| parse(text, "x").unwrap().rate_limit;
        assert_eq!(rl("").reserved_for_refresh, 10);
        assert_eq!(rl("[rate_limit]\nlogins_per_day = 9\n").reserved_for_refresh, 0);
        assert_eq!(rl("[rate_limit]\nlogins_per_day = 19\n").reserved_for_refresh, 1);
        assert_eq!(rl("[rate_limit]\nlogins_per_day = 1\n").reserved_for_refresh, 0);
        assert_eq!(rl("[rate_limit]\nreserved_for_refresh = 0\n").reserved_for_refresh, 0);
        assert_eq!(rl("[rate_limit]\nreserved_for_refresh = 99\n").reserved_for_refresh, 99);
        assert_eq!(rl("[rate_limit]\nlogins_per_day = 5\nreserved_for_refresh = 4\n").reserved_for_refresh, 4);
        for text in [
            "[rate_limit]\nreserved_for_refresh = 100\n",
            "[rate_limit]\nlogins_per_day = 5\nreserved_for_refresh = 5\n",
            "[rate_limit]\nreserved_for_refresh = 500\nlogins_per_day = 50\n",
            "[rate_limit]\nreserved_for_refresh = -1\n",
            "[rate_limit]\nreserved_for_refresh = 99999999999\n",
        ] {
            let e = err(text);
            assert_eq!(e.key.as_deref(), Some("rate_limit.reserved_for_refresh"), "{text:?}: {e}");
            assert!(e.position.is_some() && e.message.contains("less than rate_limit.logins_per_day"), "{e}");
        }
        let e = err("[rate_limit]\nreserved_for_refresh = \"ten\"\n");
        assert_eq!(e.key.as_deref(), Some("rate_limit.reserved_for_refresh"));
    }

    #[test]
    fn sandbox_table() {
        assert!(parse("[sandbox]\n", "x").unwrap().sandbox.enabled);
        assert!(parse("[sandbox]\nenabled = true\n", "x").unwrap().sandbox.enabled);
        assert!(!parse("[sandbox]\nenabled = false\n", "x").unwrap().sandbox.enabled);
        let e = err("[sandbox]\nenable = false\n");
        assert_eq!(e.key.as_deref(), Some("sandbox.enable"));
        assert_eq!(e.position, Some((2, 1)));
    }

    /// A config naming `dir` as its state directory.
    fn with_state_dir(dir: &Path) -> Config {
        parse(&format!("state_dir = {:?}\n", dir.display().to_string()), "c.toml").unwrap()
    }

    #[test]
    fn check_state_dir_creates_a_private_directory() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/state");
        assert_eq!(check_state_dir(&with_state_dir(&dir)).unwrap(), dir);
        assert!(dir.is_dir());
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "the write check leaves nothing behind");
        // An existing directory is accepted as it is.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
        assert_eq!(check_state_dir(&with_state_dir(&dir)).unwrap(), dir);
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o750);
    }

    #[test]
    fn check_state_dir_refuses_what_is_not_a_writable_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let cases = [
            (file.clone(), "is not a directory"),
            (file.join("below"), "cannot be created"),
            (PathBuf::from("/proc/entrupy-tokend-state"), "cannot be created"),
            (PathBuf::from("/proc/self"), "is not writable"),
        ];
        for (dir, says) in cases {
            let e = check_state_dir(&with_state_dir(&dir)).unwrap_err();
            assert_eq!(e.file, "c.toml");
            assert_eq!(e.key.as_deref(), Some("state_dir"), "{e}");
            assert!(e.message.contains(&dir.display().to_string()) && e.message.contains(says), "{e}");
            assert!(e.to_string().starts_with("c.toml: state_dir: state directory "), "{e}");
        }
        // A hand-built config with a relative directory.
        let mut c = with_state_dir(Path::new("/x"));
        c.state_dir = Some(PathBuf::from("relative"));
        assert!(check_state_dir(&c).unwrap_err().message.contains("not an absolute path"));
    }

    #[test]
    fn check_credentials_applies_the_credential_rules() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("cred");
        let text = format!(
            "[backend]\nurl = \"https://x/sign\"\n[[session]]\nid = \"a\"\nunique_user_id = \"abcdefgh\"\nemail = \"a@b\"\nbackend_token_file = {:?}\n",
            f.display().to_string()
        );
        let c = parse(&text, "c.toml").unwrap();
        let cases: &[(&[u8], &str)] =
            &[(b"hunter2\nsecond-line\n", "malformed"), (b"\n", "empty"), (b"hunter2\x07\n", "malformed")];
        for (content, says) in cases {
            std::fs::write(&f, content).unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
            let e = check_credentials(&c, "c.toml").unwrap_err();
            assert_eq!(e.key.as_deref(), Some("session[0].backend_token_file"));
            let shown = e.to_string();
            assert!(shown.contains(&f.display().to_string()) && shown.contains(says), "{shown}");
            assert!(!shown.contains("hunter2") && !shown.contains("second-line"), "{shown}");
        }
        std::fs::write(&f, vec![b'x'; 64 * 1024 + 1]).unwrap();
        assert!(check_credentials(&c, "c.toml").unwrap_err().message.contains("larger than 64 KiB"));
        std::fs::write(&f, "hunter2\r\n").unwrap();
        check_credentials(&c, "c.toml").unwrap();
        assert_eq!(check_credential_file(&CredentialSource::File(f.clone())), Ok(f.clone()));
        std::fs::remove_file(&f).unwrap();
        std::fs::create_dir(&f).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(check_credentials(&c, "c.toml").unwrap_err().message.contains("not a regular file"));
    }

    #[test]
    fn loopback_http_is_allowed() {
        for u in [
            "http://127.0.0.1:1/x",
            "http://127.3.4.5/",
            "http://[::1]:9/",
            "http://localhost/",
            "https://example.com/",
        ] {
            assert!(validate_url(u).is_ok(), "{u}");
        }
        for u in ["http://example.com/", "http://192.168.1.1/", "http://[::2]/", "https://u:p@example.com/"] {
            assert!(validate_url(u).is_err(), "{u}");
        }
    }

    #[test]
    fn ids_and_user_ids() {
        assert!(validate_session_id("default").is_ok());
        assert!(validate_session_id("a-b_c9").is_ok());
        assert!(validate_session_id(&"a".repeat(64)).is_ok());
        assert!(validate_session_id(&"a".repeat(65)).is_err());
        assert!(validate_session_id("").is_err());
        assert!(validate_session_id("A").is_err());
        assert!(validate_unique_user_id("user@x.y+z_-").is_ok());
        assert!(validate_unique_user_id(&"u".repeat(40)).is_ok());
        assert!(validate_unique_user_id(&"u".repeat(41)).is_err());
        assert!(validate_unique_user_id("1234567").is_err());
    }

    #[test]
    fn credential_modes_are_checked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("cred");
        std::fs::write(&f, "secret").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        let text = format!("[backend]\nurl = \"https://x/sign\"\ntoken_file = {:?}\n", f.display().to_string());
        let c = parse(&text, "c.toml").unwrap();
        let e = check_credentials(&c, "c.toml").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("backend.token_file"));
        assert!(e.message.contains(&f.display().to_string()));
        assert!(!e.to_string().contains("secret"));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        check_credentials(&c, "c.toml").unwrap();
        let missing = "[backend]\nurl = \"https://x/sign\"\ntoken_file = \"/nonexistent/cred\"\n";
        let c = parse(missing, "c.toml").unwrap();
        assert!(check_credentials(&c, "c.toml").unwrap_err().message.contains("/nonexistent/cred"));
    }

    proptest::proptest! {
        /// Fuzzing by property: no text makes the parser panic, and every error names the
        /// file.
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
            if let Err(e) = parse(&text, "f.toml") {
                proptest::prop_assert!(e.to_string().starts_with("f.toml"));
            }
        }

        /// Valid configs with one value replaced by arbitrary text.
        #[test]
        fn mutated_values_never_panic(idx in 0usize..40, junk in "\\PC{0,30}") {
            let lines: Vec<&str> = FULL.lines().collect();
            let mut out = Vec::new();
            for (i, l) in lines.iter().enumerate() {
                if i == idx % lines.len() && l.contains('=') {
                    let key = l.split('=').next().unwrap_or("");
                    out.push(format!("{key}= {junk:?}"));
                } else {
                    out.push((*l).to_owned());
                }
            }
            let _ = parse(&out.join("\n"), "f.toml");
        }
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("abc", 0), (1, 1));
        assert_eq!(line_col("abc\ndef", 5), (2, 2));
        assert_eq!(line_col("é\nx", 3), (2, 1));
    }
}
