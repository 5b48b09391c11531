//! The configuration file a test server starts with: the keys of the brief's config contract
//! (`[server]`, `[c2s]`, `[tls]`, `[auth]`, `[registration]`, `[log]`), the shared test
//! certificate under `[tls] certificates`, and any extra TOML a test adds, merged key by key
//! over the generated values. Listen addresses are not in the file: the harness passes them on
//! the command line (`127.0.0.1:0`), as the readiness contract expects.

use std::fmt;

use toml::{Table, Value};

use crate::{HarnessError, TestCert};

/// Who may register accounts in band (XEP-0077), the `[registration] mode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    /// Anyone.
    Open,
    /// No one.
    Closed,
    /// Only clients on loopback addresses.
    Loopback,
}

impl fmt::Display for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Registration::Open => "open",
            Registration::Closed => "closed",
            Registration::Loopback => "loopback",
        })
    }
}

/// A test server's configuration, written as TOML by [`ServerConfig::to_toml`].
///
/// Only what a test sets is written, except the domains, the registration mode, the
/// certificate and the log level; everything else keeps the server's documented default.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    domains: Vec<String>,
    registration: Registration,
    log_level: String,
    values: Table,
    extra: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            domains: vec!["example.test".to_owned()],
            registration: Registration::Open,
            log_level: std::env::var("STARLING_TEST_LOG").unwrap_or_else(|_| "info".to_owned()),
            values: Table::new(),
            extra: Vec::new(),
        }
    }
}

impl ServerConfig {
    /// The served domains; the first is the one clients use by default.
    pub fn domains(&self) -> &[String] {
        &self.domains
    }

    /// Replaces the served domains. Each must be covered by the test certificate.
    pub fn set_domains(&mut self, domains: Vec<String>) {
        self.domains = domains;
    }

    /// Sets `[registration] mode`.
    pub fn set_registration(&mut self, mode: Registration) {
        self.registration = mode;
    }

    /// Sets `[log] level` (an `EnvFilter` directive; `STARLING_TEST_LOG` sets the default).
    pub fn set_log_level(&mut self, level: impl Into<String>) {
        self.log_level = level.into();
    }

    /// Sets `[section] key = value`.
    pub fn set(&mut self, section: &str, key: &str, value: impl Into<Value>) {
        let entry = self
            .values
            .entry(section.to_owned())
            .or_insert_with(|| Value::Table(Table::new()));
        if !entry.is_table() {
            *entry = Value::Table(Table::new());
        }
        if let Value::Table(table) = entry {
            table.insert(key.to_owned(), value.into());
        }
    }

    /// Adds a TOML fragment merged over everything else (tables merge key by key; any other
    /// value replaces what was there).
    pub fn add_toml(&mut self, fragment: impl Into<String>) {
        self.extra.push(fragment.into());
    }

    /// The file's contents, naming `cert`'s chain and key.
    pub fn to_toml(&self, cert: &TestCert) -> Result<String, HarnessError> {
        if self.domains.is_empty() {
            return Err(HarnessError::Config(
                "a server needs at least one domain".into(),
            ));
        }
        if let Some(bad) = self.domains.iter().find(|d| !TestCert::covers(d)) {
            return Err(HarnessError::Config(format!(
                "domain {bad:?} is not covered by the test certificate (names: {:?}); \
                 add it to testkit's CERT_NAMES",
                crate::CERT_NAMES
            )));
        }
        let mut root = Table::new();
        let mut server = Table::new();
        server.insert(
            "domains".into(),
            Value::Array(self.domains.iter().cloned().map(Value::String).collect()),
        );
        root.insert("server".into(), Value::Table(server));

        let mut pair = Table::new();
        pair.insert(
            "cert".into(),
            Value::String(cert.cert_pem_path().display().to_string()),
        );
        pair.insert(
            "key".into(),
            Value::String(cert.key_pem_path().display().to_string()),
        );
        let mut tls = Table::new();
        tls.insert(
            "certificates".into(),
            Value::Array(vec![Value::Table(pair)]),
        );
        root.insert("tls".into(), Value::Table(tls));

        let mut registration = Table::new();
        registration.insert("mode".into(), Value::String(self.registration.to_string()));
        root.insert("registration".into(), Value::Table(registration));

        let mut log = Table::new();
        log.insert("level".into(), Value::String(self.log_level.clone()));
        root.insert("log".into(), Value::Table(log));

        merge(&mut root, self.values.clone());
        for fragment in &self.extra {
            let table: Table = fragment
                .parse()
                .map_err(|e| HarnessError::Config(format!("extra TOML {fragment:?}: {e}")))?;
            merge(&mut root, table);
        }
        toml::to_string(&root)
            .map_err(|e| HarnessError::Config(format!("serialising the configuration: {e}")))
    }
}

/// Merges `over` into `base`: tables recursively, anything else replaced.
fn merge(base: &mut Table, over: Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(Value::Table(base_table)), Value::Table(over_table)) => {
                merge(base_table, over_table)
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared_cert;

    fn parsed(config: &ServerConfig) -> Table {
        config
            .to_toml(shared_cert().unwrap())
            .unwrap()
            .parse()
            .unwrap()
    }

    fn get<'a>(table: &'a Table, path: &str) -> Option<&'a Value> {
        let mut parts = path.split('.');
        let mut value = table.get(parts.next()?)?;
        for part in parts {
            value = value.as_table()?.get(part)?;
        }
        Some(value)
    }

    #[test]
    fn defaults_name_domain_registration_log_and_certificate() {
        let table = parsed(&ServerConfig::default());
        assert_eq!(
            get(&table, "server.domains").unwrap().as_array().unwrap(),
            &vec![Value::String("example.test".into())]
        );
        assert_eq!(
            get(&table, "registration.mode").unwrap().as_str(),
            Some("open")
        );
        assert!(get(&table, "log.level").unwrap().as_str().is_some());
        let pairs = get(&table, "tls.certificates").unwrap().as_array().unwrap();
        assert_eq!(pairs.len(), 1);
        let cert = shared_cert().unwrap();
        assert_eq!(
            pairs[0].get("cert").unwrap().as_str().unwrap(),
            cert.cert_pem_path().display().to_string()
        );
        assert_eq!(
            pairs[0].get("key").unwrap().as_str().unwrap(),
            cert.key_pem_path().display().to_string()
        );
        // Nothing a test did not ask for: the server's own defaults apply.
        assert!(get(&table, "c2s").is_none());
    }

    #[test]
    fn set_values_and_extra_toml_merge_key_by_key() {
        let mut config = ServerConfig::default();
        config.set_domains(vec!["localhost".into(), "a.example.test".into()]);
        config.set_registration(Registration::Closed);
        config.set("c2s", "max_stanza_size", 4096);
        config.set("c2s", "require_tls", false);
        config.add_toml("[c2s]\nmax_stanza_size = 8192\nrate_burst_bytes = 100\n");
        config.add_toml("[registration.hosts]\n\"localhost\" = \"open\"\n");
        let table = parsed(&config);
        assert_eq!(
            get(&table, "c2s.max_stanza_size").unwrap().as_integer(),
            Some(8192)
        );
        assert_eq!(
            get(&table, "c2s.rate_burst_bytes").unwrap().as_integer(),
            Some(100)
        );
        assert_eq!(
            get(&table, "c2s.require_tls").unwrap().as_bool(),
            Some(false)
        );
        assert_eq!(
            get(&table, "registration.mode").unwrap().as_str(),
            Some("closed")
        );
        assert_eq!(
            get(&table, "registration.hosts.localhost")
                .unwrap()
                .as_str(),
            Some("open")
        );
        assert_eq!(
            get(&table, "server.domains")
                .unwrap()
                .as_array()
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn domains_outside_the_certificate_and_bad_toml_are_refused() {
        let mut config = ServerConfig::default();
        config.set_domains(vec!["example.org".into()]);
        let err = config.to_toml(shared_cert().unwrap()).unwrap_err();
        assert!(err.to_string().contains("example.org"), "{err}");

        let mut config = ServerConfig::default();
        config.add_toml("[c2s");
        assert!(matches!(
            config.to_toml(shared_cert().unwrap()),
            Err(HarnessError::Config(_))
        ));

        let mut config = ServerConfig::default();
        config.set_domains(Vec::new());
        assert!(config.to_toml(shared_cert().unwrap()).is_err());
    }
}
