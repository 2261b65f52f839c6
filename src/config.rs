//! The configuration file (SPEC section 3): parsing, defaults and validation.
//!
//! [`parse`] is pure: text in, a validated [`Config`] or a [`ConfigError`] out. [`load`] finds
//! and reads the file and checks what only the file system can tell (credential files and
//! their permissions). Nothing here starts tasks or talks to the network.

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
    /// 8-40 chars of `A-Za-z0-9@.+_-`.
    pub unique_user_id: String,
    /// The user's e-mail address.
    pub email: String,
    /// Optional given name.
    pub first_name: Option<String>,
    /// Optional family name.
    pub last_name: Option<String>,
    /// Overrides `[backend].token_file`.
    pub backend_token_file: Option<CredentialSource>,
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Overrides the state directory.
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
    /// Token access allow-list.
    pub access: AccessConfig,
    /// Configured sessions, in file order, ids unique.
    pub sessions: Vec<SessionConfig>,
}

impl Default for Config {
    fn default() -> Self {
        // Parsing the empty file gives exactly the documented defaults; it cannot fail.
        #[allow(clippy::expect_used)]
        parse("", "<defaults>").expect("the empty config is valid")
    }
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
    pace: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotify {
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

    fn duration(&self, key: &str, v: &Option<Spanned<String>>, default: Duration) -> Result<Duration, ConfigError> {
        match v {
            None => Ok(default),
            Some(s) => parse_duration(s.get_ref()).map_err(|m| self.err_at(key, Some(s.span()), m)),
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

/// Parses a six-field cron schedule (seconds first), as `check_schedule` takes it.
pub fn parse_schedule(s: &str) -> Result<croner::Cron, String> {
    let fields = s.split_whitespace().count();
    if fields != 6 {
        return Err(format!("{s:?} has {fields} fields; six are needed (sec min hour day-of-month month day-of-week)"));
    }
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .year(croner::parser::Year::Disallowed)
        .build()
        .parse(s)
        .map_err(|e| format!("invalid cron schedule {s:?}: {e}"))
}

fn positive_u32(ctx: &Ctx<'_>, key: &str, v: &Option<Spanned<i64>>, default: u32) -> Result<u32, ConfigError> {
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
/// reads no file (credential files are checked by [`check_credentials`]).
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
    let ctx = Ctx { file, text };
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let message = e.message().trim().to_owned();
        let offset = e.span().map(|s| s.start);
        let key = match (unknown_key_name(&message), offset) {
            (Some(k), Some(o)) => Some(match table_at(text, o) {
                Some(t) => format!("{t}.{k}"),
                None => k,
            }),
            (Some(k), None) => Some(k),
            (None, Some(o)) => key_at(text, o),
            (None, None) => None,
        };
        ConfigError { file: file.to_owned(), key, position: offset.map(|o| line_col(text, o)), message }
    })?;

    let state_dir = match &raw.state_dir {
        None => None,
        Some(s) if s.get_ref().is_empty() => return Err(ctx.err_at("state_dir", Some(s.span()), "empty path")),
        Some(s) => Some(PathBuf::from(s.get_ref())),
    };

    let api_url = match raw.entrupy.as_ref().and_then(|e| e.api_url.as_ref()) {
        None => validate_url(DEFAULT_API_URL).map_err(|m| ctx.err_at("entrupy.api_url", None, m))?,
        Some(s) => ctx.url("entrupy.api_url", s)?,
    };

    let mut http_timeout = Duration::from_secs(15);
    let backend = match &raw.backend {
        None => None,
        Some(b) => {
            let span = b.span();
            let b = b.get_ref();
            http_timeout = ctx.duration("backend.timeout", &b.timeout, http_timeout)?;
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
            Some(BackendConfig { url, token_file })
        }
    };

    let r = raw.refresh.as_ref();
    let margin = ctx.duration("refresh.margin", &r.and_then(|r| r.margin.clone()), Duration::from_secs(300))?;
    let jitter = ctx.duration("refresh.jitter", &r.and_then(|r| r.jitter.clone()), Duration::from_secs(30))?;
    let backoff_initial =
        ctx.duration("refresh.backoff_initial", &r.and_then(|r| r.backoff_initial.clone()), Duration::from_secs(2))?;
    let backoff_max =
        ctx.duration("refresh.backoff_max", &r.and_then(|r| r.backoff_max.clone()), Duration::from_secs(300))?;
    if backoff_initial.is_zero() {
        let span = r.and_then(|r| r.backoff_initial.as_ref()).map(|s| s.span());
        return Err(ctx.err_at("refresh.backoff_initial", span, "must be more than 0"));
    }
    if backoff_max < backoff_initial {
        let span = r.and_then(|r| r.backoff_max.as_ref()).map(|s| s.span());
        return Err(ctx.err_at("refresh.backoff_max", span, "must not be less than refresh.backoff_initial"));
    }
    let check_schedule = match r.and_then(|r| r.check_schedule.as_ref()) {
        None => "0 * * * * *".to_owned(),
        Some(s) => {
            parse_schedule(s.get_ref()).map_err(|m| ctx.err_at("refresh.check_schedule", Some(s.span()), m))?;
            s.get_ref().clone()
        }
    };

    let rl = raw.rate_limit.as_ref();
    let rate_limit = RateLimitConfig {
        logins_per_minute: positive_u32(
            &ctx,
            "rate_limit.logins_per_minute",
            &rl.and_then(|r| r.logins_per_minute.clone()),
            5,
        )?,
        logins_per_day: positive_u32(
            &ctx,
            "rate_limit.logins_per_day",
            &rl.and_then(|r| r.logins_per_day.clone()),
            100,
        )?,
        pace: rl.and_then(|r| r.pace).unwrap_or(false),
    };

    let notify = NotifyConfig { enabled: raw.notify.as_ref().and_then(|n| n.enabled).unwrap_or(true) };

    let access = match raw.access.as_ref().and_then(|a| a.token_executables.as_ref()) {
        None => AccessConfig::default(),
        Some(list) => {
            let mut out = Vec::new();
            for p in list.get_ref() {
                if !p.starts_with('/') {
                    return Err(ctx.err_at(
                        "access.token_executables",
                        Some(list.span()),
                        format!("{p:?} is not an absolute path"),
                    ));
                }
                out.push(PathBuf::from(p));
            }
            AccessConfig { token_executables: Some(out) }
        }
    };

    let mut sessions: Vec<SessionConfig> = Vec::with_capacity(raw.session.len());
    for (i, s) in raw.session.iter().enumerate() {
        let span = s.span();
        let s = s.get_ref();
        let key = |k: &str| format!("session[{i}].{k}");
        let required = |v: &Option<Spanned<String>>, k: &str| -> Result<Spanned<String>, ConfigError> {
            v.clone()
                .ok_or_else(|| ctx.err_at(&key(k), Some(span.clone()), format!("missing; every [[session]] needs {k}")))
        };
        let id = required(&s.id, "id")?;
        validate_session_id(id.get_ref()).map_err(|m| ctx.err_at(&key("id"), Some(id.span()), m))?;
        if sessions.iter().any(|o| &o.id == id.get_ref()) {
            return Err(ctx.err_at(&key("id"), Some(id.span()), format!("duplicate session id {:?}", id.get_ref())));
        }
        let uid = required(&s.unique_user_id, "unique_user_id")?;
        validate_unique_user_id(uid.get_ref()).map_err(|m| ctx.err_at(&key("unique_user_id"), Some(uid.span()), m))?;
        let email = required(&s.email, "email")?;
        validate_email(email.get_ref()).map_err(|m| ctx.err_at(&key("email"), Some(email.span()), m))?;
        let name = |v: &Option<Spanned<String>>, k: &str| -> Result<Option<String>, ConfigError> {
            match v {
                None => Ok(None),
                Some(n) => {
                    validate_name(n.get_ref()).map_err(|m| ctx.err_at(&key(k), Some(n.span()), m))?;
                    Ok(Some(n.get_ref().clone()))
                }
            }
        };
        let backend_token_file =
            s.backend_token_file.as_ref().map(|t| ctx.credential(&key("backend_token_file"), t)).transpose()?;
        sessions.push(SessionConfig {
            id: id.into_inner(),
            unique_user_id: uid.into_inner(),
            email: email.into_inner(),
            first_name: name(&s.first_name, "first_name")?,
            last_name: name(&s.last_name, "last_name")?,
            backend_token_file,
        });
    }

    Ok(Config {
        state_dir,
        api_url,
        backend,
        http_timeout,
        refresh: RefreshConfig { margin, jitter, check_schedule, backoff_initial, backoff_max },
        rate_limit,
        notify,
        access,
        sessions,
    })
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

/// Checks every credential file the config names: it must exist, be a regular file, be
/// readable, and have no group or other permission bits.
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
        check_credential_file(&src).map_err(|message| ConfigError {
            file: file.to_owned(),
            key: Some(key),
            position: None,
            message,
        })?;
    }
    Ok(())
}

/// Checks one credential file's existence and mode; the message names the file.
pub fn check_credential_file(src: &CredentialSource) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let path = src.path()?;
    let meta = std::fs::metadata(&path).map_err(|e| format!("credential file {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("credential file {} is not a regular file", path.display()));
    }
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "credential file {} has mode {:04o}; it must not be readable by group or others (chmod 600 {})",
            path.display(),
            mode & 0o7777,
            path.display()
        ));
    }
    Ok(path)
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
        None => home_dir()?.join(".config"),
    };
    Ok(ConfigLocation { path: base.join("entrupy-tokend").join("config.toml"), explicit: false })
}

fn home_dir() -> Result<PathBuf, String> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| "neither $XDG_CONFIG_HOME nor $HOME is set".to_owned())
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

/// Resolves the state directory: config `state_dir`, else `$STATE_DIRECTORY`, else
/// `$XDG_STATE_HOME/entrupy-tokend` (`~/.local/state/...`).
pub fn state_dir(config: &Config) -> Result<PathBuf, String> {
    if let Some(d) = &config.state_dir {
        return Ok(d.clone());
    }
    if let Some(d) = std::env::var_os("STATE_DIRECTORY").filter(|d| !d.is_empty()) {
        // systemd may pass several colon-separated directories; the first is ours.
        let s = PathBuf::from(d);
        let first = s.to_string_lossy().split(':').next().map(PathBuf::from).unwrap_or(s);
        return Ok(first);
    }
    let base = match std::env::var_os("XDG_STATE_HOME").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => home_dir()?.join(".local").join("state"),
    };
    Ok(base.join("entrupy-tokend"))
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
        assert_eq!(c.rate_limit, RateLimitConfig { logins_per_minute: 5, logins_per_day: 100, pace: false });
        assert!(c.sessions.is_empty());
        assert!(c.notify.enabled);
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
        assert_eq!(c.sessions[0].first_name.as_deref(), Some("Ada"));
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
