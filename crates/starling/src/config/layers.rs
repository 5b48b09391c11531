//! Loading: defaults, then the TOML file, then `STARLING_<SECTION>__<KEY>` environment
//! variables, then command-line flags, each layer replacing whole keys of the one before.
//!
//! The layers are merged as TOML tables and deserialised once. Every key is first checked on its
//! own (a one-key section deserialised over the defaults), so one run reports every unknown key
//! and every ill-typed value, each with its path and the layer that set it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use toml::{Table, Value};

use super::{
    AdminConfig, AuthConfig, C2sConfig, Config, ConfigError, LogConfig, RegistrationConfig,
    RegistryConfig, ServerConfig, TlsConfig,
};

/// The prefix of configuration environment variables.
pub(crate) const ENV_PREFIX: &str = "STARLING_";
/// The separator between section and key in an environment variable name.
const ENV_SEPARATOR: &str = "__";

/// Where the configuration comes from, apart from the defaults.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sources {
    /// The TOML file, if any.
    pub(crate) file: Option<PathBuf>,
    /// The process environment (all of it; only `STARLING_*__*` names are read).
    pub(crate) env: Vec<(String, String)>,
    /// Command-line flags.
    pub(crate) cli: CliOverrides,
}

/// The command-line flags that override configuration keys. Repeatable flags replace the whole
/// list when given at least once.
#[derive(Debug, Clone, Default)]
pub(crate) struct CliOverrides {
    /// `--data-dir` → `server.data_dir`.
    pub(crate) data_dir: Option<PathBuf>,
    /// `--domain` → `server.domains`.
    pub(crate) domains: Vec<String>,
    /// `--c2s-listen` → `c2s.listen_starttls`.
    pub(crate) c2s_listen: Vec<String>,
    /// `--c2s-tls-listen` → `c2s.listen_direct_tls`.
    pub(crate) c2s_tls_listen: Vec<String>,
    /// `--admin-listen` → `admin.listen`.
    pub(crate) admin_listen: Option<String>,
    /// `--registration` → `registration.mode`.
    pub(crate) registration: Option<String>,
    /// `--log-level` → `log.level`.
    pub(crate) log_level: Option<String>,
    /// `starling registry` flags → `registry.*`.
    pub(crate) registry: RegistryOverrides,
}

/// The flags of `starling registry` that override `[registry]` keys.
#[derive(Debug, Clone, Default)]
pub(crate) struct RegistryOverrides {
    /// `--listen` → `registry.listen`.
    pub(crate) listen: Option<String>,
    /// `--advertise` → `registry.advertise`.
    pub(crate) advertise: Option<String>,
    /// `--node-id` → `registry.node_id`.
    pub(crate) node_id: Option<u64>,
    /// `--initial-member` → `registry.initial_members`.
    pub(crate) initial_members: Vec<String>,
    /// `--shards` → `registry.shards`.
    pub(crate) shards: Option<u32>,
}

impl RegistryOverrides {
    fn entries(&self, out: &mut Vec<(&'static str, &'static str, Value, &'static str)>) {
        if let Some(v) = &self.listen {
            out.push(("registry", "listen", Value::String(v.clone()), "--listen"));
        }
        if let Some(v) = &self.advertise {
            out.push((
                "registry",
                "advertise",
                Value::String(v.clone()),
                "--advertise",
            ));
        }
        if let Some(v) = self.node_id {
            let v = i64::try_from(v).unwrap_or(i64::MAX);
            out.push(("registry", "node_id", Value::Integer(v), "--node-id"));
        }
        if !self.initial_members.is_empty() {
            let list = self
                .initial_members
                .iter()
                .cloned()
                .map(Value::String)
                .collect();
            out.push((
                "registry",
                "initial_members",
                Value::Array(list),
                "--initial-member",
            ));
        }
        if let Some(v) = self.shards {
            out.push((
                "registry",
                "shards",
                Value::Integer(i64::from(v)),
                "--shards",
            ));
        }
    }
}

impl CliOverrides {
    /// `(section, key, value, flag)` for every flag given.
    fn entries(&self) -> Vec<(&'static str, &'static str, Value, &'static str)> {
        let mut out = Vec::new();
        let strings = |v: &[String]| Value::Array(v.iter().cloned().map(Value::String).collect());
        if let Some(dir) = &self.data_dir {
            out.push((
                "server",
                "data_dir",
                Value::String(dir.to_string_lossy().into_owned()),
                "--data-dir",
            ));
        }
        if !self.domains.is_empty() {
            out.push(("server", "domains", strings(&self.domains), "--domain"));
        }
        if !self.c2s_listen.is_empty() {
            out.push((
                "c2s",
                "listen_starttls",
                strings(&self.c2s_listen),
                "--c2s-listen",
            ));
        }
        if !self.c2s_tls_listen.is_empty() {
            out.push((
                "c2s",
                "listen_direct_tls",
                strings(&self.c2s_tls_listen),
                "--c2s-tls-listen",
            ));
        }
        if let Some(addr) = &self.admin_listen {
            out.push((
                "admin",
                "listen",
                Value::String(addr.clone()),
                "--admin-listen",
            ));
        }
        if let Some(mode) = &self.registration {
            out.push((
                "registration",
                "mode",
                Value::String(mode.clone()),
                "--registration",
            ));
        }
        if let Some(level) = &self.log_level {
            out.push(("log", "level", Value::String(level.clone()), "--log-level"));
        }
        self.registry.entries(&mut out);
        out
    }
}

/// The merged configuration before semantic validation.
#[derive(Debug, Clone)]
pub(crate) struct Loaded {
    /// The typed tree; keys that failed to deserialise hold their defaults.
    pub(crate) config: Config,
    /// `section.key` → the layer that set it, for keys not left at their default.
    pub(crate) origins: BTreeMap<String, String>,
    /// Unknown keys, ill-typed values, malformed variables.
    pub(crate) errors: Vec<ConfigError>,
}

impl Loaded {
    /// The layer that set `section.key`, if not the defaults.
    pub(crate) fn origin(&self, path: &str) -> Option<String> {
        origin_of(&self.origins, path)
    }
}

/// Reads every layer and merges them. Only a file that cannot be read or is not TOML stops here
/// (there is nothing to check key by key); everything else lands in [`Loaded::errors`].
pub(crate) fn load(sources: &Sources) -> Result<Loaded, Vec<ConfigError>> {
    let defaults = default_table();
    let mut merged = Table::new();
    let mut origins = BTreeMap::new();
    let mut errors = Vec::new();

    if let Some(path) = &sources.file {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            vec![ConfigError {
                path: String::new(),
                origin: Some(origin.clone()),
                message: format!("cannot read the configuration file: {e}"),
            }]
        })?;
        let file: Table = toml::from_str(&text).map_err(|e| {
            vec![ConfigError {
                path: String::new(),
                origin: Some(origin.clone()),
                message: format!("not valid TOML: {}", e.to_string().trim_end()),
            }]
        })?;
        for (section, value) in file {
            match value {
                Value::Table(keys) => {
                    for (key, value) in keys {
                        origins.insert(format!("{section}.{key}"), origin.clone());
                        set(&mut merged, &section, key, value);
                    }
                }
                other => {
                    // Kept as it is so the section check reports it with the others.
                    origins.insert(format!("{section}."), origin.clone());
                    merged.insert(section, other);
                }
            }
        }
    }

    for (name, raw) in &sources.env {
        match env_entry(name, raw, &defaults) {
            EnvEntry::Ignored => {}
            EnvEntry::Malformed(message) => errors.push(ConfigError {
                path: String::new(),
                origin: Some(name.clone()),
                message,
            }),
            EnvEntry::Set {
                section,
                key,
                value,
            } => {
                origins.insert(format!("{section}.{key}"), name.clone());
                set(&mut merged, &section, key, value);
            }
        }
    }

    for (section, key, value, flag) in sources.cli.entries() {
        origins.insert(format!("{section}.{key}"), flag.to_owned());
        set(&mut merged, section, key.to_owned(), value);
    }

    let mut key_errors = check_keys(&mut merged, &defaults);
    for e in &mut key_errors {
        e.origin = origin_of(&origins, &e.path);
    }
    errors.extend(key_errors);

    let config = match Value::Table(merged).try_into::<Config>() {
        Ok(config) => config,
        Err(e) => {
            // `check_keys` removed every key that fails on its own; a failure here would be a
            // bug in that check, reported rather than hidden.
            errors.push(ConfigError::new("", first_line(e.message())));
            Config::default()
        }
    };
    Ok(Loaded {
        config,
        origins,
        errors,
    })
}

fn origin_of(origins: &BTreeMap<String, String>, path: &str) -> Option<String> {
    let mut parts = path.splitn(3, '.');
    let section = parts.next().unwrap_or_default();
    // `server.domains[1]` and `tls.certificates[0].cert` were set as one key.
    let key = parts
        .next()
        .unwrap_or_default()
        .split('[')
        .next()
        .unwrap_or_default();
    origins
        .get(&format!("{section}.{key}"))
        .or_else(|| origins.get(&format!("{section}.")))
        .cloned()
}

fn set(merged: &mut Table, section: &str, key: String, value: Value) {
    let entry = merged
        .entry(section.to_owned())
        .or_insert_with(|| Value::Table(Table::new()));
    match entry {
        Value::Table(keys) => {
            keys.insert(key, value);
        }
        other => {
            // A later layer sets a key of a section an earlier one gave as a non-table: the
            // later layer wins, as it would for any key.
            let mut keys = Table::new();
            keys.insert(key, value);
            *other = Value::Table(keys);
        }
    }
}

/// The defaults as a TOML table: the list of sections and keys, and each key's type, for
/// reading environment variables.
pub(crate) fn default_table() -> Table {
    match Value::try_from(Config::default()) {
        Ok(Value::Table(table)) => table,
        // The defaults are plain structs, strings and numbers: serialising them cannot fail.
        _ => Table::new(),
    }
}

/// Deserialises `table` as the section `name`; `Err` with the message when it does not fit.
fn check_section(name: &str, table: &Table) -> Result<(), toml::de::Error> {
    fn de<T: DeserializeOwned>(table: &Table) -> Result<(), toml::de::Error> {
        Value::Table(table.clone()).try_into::<T>().map(drop)
    }
    match name {
        "server" => de::<ServerConfig>(table),
        "c2s" => de::<C2sConfig>(table),
        "tls" => de::<TlsConfig>(table),
        "auth" => de::<AuthConfig>(table),
        "registration" => de::<RegistrationConfig>(table),
        "admin" => de::<AdminConfig>(table),
        "log" => de::<LogConfig>(table),
        "registry" => de::<RegistryConfig>(table),
        // Sections are checked against the defaults' list before this is called.
        _ => Ok(()),
    }
}

/// Checks every key on its own, removes the ones that fail and returns an error for each.
fn check_keys(merged: &mut Table, defaults: &Table) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    let sections: Vec<String> = merged.keys().cloned().collect();
    let known = defaults
        .keys()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ");
    for section in sections {
        if !defaults.contains_key(&section) {
            errors.push(ConfigError::new(
                section.clone(),
                format!("unknown section `{section}`, expected one of {known}"),
            ));
            merged.remove(&section);
            continue;
        }
        let Some(Value::Table(keys)) = merged.get_mut(&section) else {
            errors.push(ConfigError::new(
                section.clone(),
                "must be a table (a `[section]` of keys)",
            ));
            merged.remove(&section);
            continue;
        };
        if check_section(&section, keys).is_ok() {
            continue;
        }
        let names: Vec<String> = keys.keys().cloned().collect();
        for key in names {
            let Some(value) = keys.get(&key) else {
                continue;
            };
            let mut single = Table::new();
            single.insert(key.clone(), value.clone());
            if let Err(e) = check_section(&section, &single) {
                errors.push(de_error(&section, &key, &e));
                keys.remove(&key);
            }
        }
        if let Err(e) = check_section(&section, keys) {
            errors.push(ConfigError::new(section.clone(), first_line(e.message())));
            merged.remove(&section);
        }
    }
    errors
}

/// A deserialisation error of `section.key`, with the deepest path the error names.
fn de_error(section: &str, key: &str, e: &toml::de::Error) -> ConfigError {
    // `Display` ends with "in `a.b.c`" when the error is nested; `message()` is the rest.
    let shown = e.to_string();
    let nested = shown
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("in `").and_then(|l| l.strip_suffix('`')))
        .filter(|p| p.starts_with(key))
        .map(|p| format!("{section}.{p}"));
    let message = first_line(e.message());
    let path = if message.starts_with("unknown field") {
        // For an unknown key serde names the section; the key is the useful path.
        format!("{section}.{key}")
    } else {
        nested.unwrap_or_else(|| format!("{section}.{key}"))
    };
    ConfigError::new(path, message)
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_owned()
}

/// What one environment variable means for the configuration.
#[derive(Debug, Clone, PartialEq)]
enum EnvEntry {
    /// Not a configuration variable.
    Ignored,
    /// Looks like one but cannot be read; the message says why.
    Malformed(String),
    /// Sets `section.key`.
    Set {
        section: String,
        key: String,
        value: Value,
    },
}

/// Reads `STARLING_<SECTION>__<KEY>=value`. Section and key are matched in lower case. The
/// value is typed by the default of the key it sets:
/// - a string key takes the text as it is (TOML quoting is accepted too);
/// - a list key takes TOML array syntax (`["a", "b"]`) or a comma-separated list;
/// - any other key (or an unknown one) is read as a TOML value, else taken as a string.
fn env_entry(name: &str, raw: &str, defaults: &Table) -> EnvEntry {
    let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
        return EnvEntry::Ignored;
    };
    let lower = rest.to_ascii_lowercase();
    let Some((section, key)) = lower.split_once(ENV_SEPARATOR) else {
        // `STARLING_C2S_REQUIRE_TLS` is a likely typo for `STARLING_C2S__REQUIRE_TLS`; other
        // `STARLING_*` names belong to something else (e.g. `STARLING_CONFIG`).
        if let Some(section) = defaults
            .keys()
            .find(|s| lower.starts_with(&format!("{s}_")))
        {
            let key = &lower[section.len() + 1..];
            return EnvEntry::Malformed(format!(
                "section and key are separated by two underscores: did you mean \
                 {ENV_PREFIX}{}{ENV_SEPARATOR}{}?",
                section.to_ascii_uppercase(),
                key.to_ascii_uppercase()
            ));
        }
        return EnvEntry::Ignored;
    };
    if section.is_empty() || key.is_empty() || key.contains(ENV_SEPARATOR) {
        return EnvEntry::Malformed(format!(
            "expected {ENV_PREFIX}<SECTION>{ENV_SEPARATOR}<KEY>"
        ));
    }
    let default = defaults
        .get(section)
        .and_then(Value::as_table)
        .and_then(|t| t.get(key));
    match env_value(raw, default) {
        Ok(value) => EnvEntry::Set {
            section: section.to_owned(),
            key: key.to_owned(),
            value,
        },
        Err(message) => EnvEntry::Malformed(message),
    }
}

/// Types an environment value by the default it replaces (see [`env_entry`]).
fn env_value(raw: &str, default: Option<&Value>) -> Result<Value, String> {
    let trimmed = raw.trim();
    match default {
        Some(Value::String(_)) => {
            if trimmed.starts_with('"') || trimmed.starts_with('\'') {
                parse_toml_value(trimmed).ok_or_else(|| "not a valid TOML string".to_owned())
            } else {
                Ok(Value::String(raw.to_owned()))
            }
        }
        Some(Value::Array(items)) => {
            // `[::]:5222` starts like a TOML array but is an address: TOML only when it parses.
            if let Some(array) = parse_toml_value(trimmed).filter(Value::is_array) {
                return Ok(array);
            }
            let strings = items.is_empty() || items.iter().all(Value::is_str);
            let elements = trimmed
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    if strings {
                        Value::String(s.to_owned())
                    } else {
                        parse_toml_value(s).unwrap_or_else(|| Value::String(s.to_owned()))
                    }
                })
                .collect();
            Ok(Value::Array(elements))
        }
        _ => Ok(parse_toml_value(trimmed).unwrap_or_else(|| Value::String(raw.to_owned()))),
    }
}

/// One TOML value (`true`, `42`, `"text"`, `[1, 2]`, `{ a = 1 }`), or `None`.
fn parse_toml_value(s: &str) -> Option<Value> {
    s.parse::<Value>().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Table {
        default_table()
    }

    #[test]
    fn env_names() {
        let d = defaults();
        assert_eq!(env_entry("PATH", "/bin", &d), EnvEntry::Ignored);
        assert_eq!(
            env_entry("STARLING_CONFIG", "x.toml", &d),
            EnvEntry::Ignored
        );
        assert_eq!(
            env_entry("STARLING_C2S__REQUIRE_TLS", "false", &d),
            EnvEntry::Set {
                section: "c2s".into(),
                key: "require_tls".into(),
                value: Value::Boolean(false)
            }
        );
        let EnvEntry::Malformed(m) = env_entry("STARLING_C2S_REQUIRE_TLS", "false", &d) else {
            panic!("a single underscore must be reported");
        };
        assert!(m.contains("STARLING_C2S__REQUIRE_TLS"), "{m}");
        assert!(matches!(
            env_entry("STARLING_C2S__A__B", "1", &d),
            EnvEntry::Malformed(_)
        ));
        assert!(matches!(
            env_entry("STARLING___KEY", "1", &d),
            EnvEntry::Malformed(_)
        ));
    }

    #[test]
    fn env_values_are_typed_by_their_default() {
        let d = defaults();
        let get = |s: &str, k: &str| d.get(s).and_then(|t| t.get(k)).cloned();
        // Strings stay strings even when they would parse as something else.
        assert_eq!(
            env_value("123", get("server", "node_name").as_ref()),
            Ok(Value::String("123".into()))
        );
        assert_eq!(
            env_value("\"quoted\"", get("server", "node_name").as_ref()),
            Ok(Value::String("quoted".into()))
        );
        assert_eq!(
            env_value("127.0.0.1:5280", get("admin", "listen").as_ref()),
            Ok(Value::String("127.0.0.1:5280".into()))
        );
        // Lists: comma-separated or TOML.
        let list =
            |v: &[&str]| Value::Array(v.iter().map(|s| Value::String((*s).into())).collect());
        assert_eq!(
            env_value("a.org, b.org,", get("server", "domains").as_ref()),
            Ok(list(&["a.org", "b.org"]))
        );
        assert_eq!(
            env_value("[::]:5222", get("c2s", "listen_starttls").as_ref()),
            Ok(list(&["[::]:5222"]))
        );
        assert_eq!(
            env_value(r#"["x", "y"]"#, get("server", "domains").as_ref()),
            Ok(list(&["x", "y"]))
        );
        assert_eq!(
            env_value(
                "[::1]:5222,[::2]:5222",
                get("c2s", "listen_starttls").as_ref()
            ),
            Ok(list(&["[::1]:5222", "[::2]:5222"]))
        );
        // Other keys: TOML where it parses, else the text.
        assert_eq!(
            env_value("4096", get("auth", "scram_iterations").as_ref()),
            Ok(Value::Integer(4096))
        );
        assert_eq!(
            env_value("lots", get("auth", "scram_iterations").as_ref()),
            Ok(Value::String("lots".into()))
        );
        let hosts = env_value(
            r#"{ "example.org" = "closed" }"#,
            get("registration", "hosts").as_ref(),
        )
        .ok()
        .and_then(|v| v.as_table().cloned());
        assert_eq!(
            hosts.and_then(|t| t.get("example.org").cloned()),
            Some(Value::String("closed".into()))
        );
        let certs = env_value(
            r#"[{ cert = "a.pem", key = "b.pem" }]"#,
            get("tls", "certificates").as_ref(),
        );
        assert!(matches!(certs, Ok(Value::Array(ref a)) if a.len() == 1));
    }
}
