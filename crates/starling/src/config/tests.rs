use std::path::PathBuf;

use super::*;
use crate::testutil::TempDir;

fn with_file(dir: &TempDir, text: &str) -> Sources {
    let path = dir.path().join("starling.toml");
    std::fs::write(&path, text).unwrap();
    Sources {
        file: Some(path),
        ..Sources::default()
    }
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn errors_of(sources: &Sources) -> Vec<ConfigError> {
    match resolve(sources) {
        Ok(_) => panic!("expected the configuration to be refused"),
        Err(ConfigErrors(errors)) => errors,
    }
}

fn paths(errors: &[ConfigError]) -> Vec<&str> {
    errors.iter().map(|e| e.path.as_str()).collect()
}

#[test]
fn no_configuration_at_all_serves_localhost_with_loopback_registration() {
    let checked = resolve(&Sources::default()).unwrap();
    let c = &checked.config;
    assert_eq!(c.server.domains, vec!["localhost"]);
    assert_eq!(c.server.data_dir, PathBuf::from("data"));
    assert_eq!(c.registration.mode, RegistrationMode::Loopback);
    assert_eq!(checked.c2s_starttls, vec!["[::]:5222".parse().unwrap()]);
    assert_eq!(checked.c2s_direct_tls, vec!["[::]:5223".parse().unwrap()]);
    assert_eq!(checked.admin, "127.0.0.1:5280".parse().unwrap());
    assert!(c.c2s.require_tls);
    assert_eq!(c.c2s.max_stanza_size, 262_144);
    assert_eq!(c.auth.scram_iterations, 4096);
    assert_eq!(c.log.format, LogFormat::Text);
    assert!(!checked.log_level_from_cli);
}

#[test]
fn the_brief_example_file_is_accepted() {
    let dir = TempDir::new("brief");
    std::fs::write(dir.path().join("cert.pem"), "x").unwrap();
    std::fs::write(dir.path().join("key.pem"), "x").unwrap();
    let text = format!(
        r#"
[server]
domains = ["localhost", "example.org"]
data_dir = "data"
node_name = "starling"
[c2s]
listen_starttls = ["[::]:5222"]
listen_direct_tls = ["[::]:5223"]
require_tls = true
max_stanza_size = 262144
max_connections_per_ip = 64
preauth_timeout_secs = 30
idle_timeout_secs = 600
keepalive_interval_secs = 120
rate_bytes_per_sec = 65536
rate_burst_bytes = 524288
outbound_queue_stanzas = 2048
[tls]
certificates = [{{ cert = "{d}/cert.pem", key = "{d}/key.pem" }}]
reload_check_secs = 30
[auth]
scram_iterations = 4096
failures_per_minute_per_ip = 10
failures_per_minute_per_account = 10
[registration]
mode = "loopback"
hosts = {{ "example.org" = "closed" }}
[admin]
listen = "127.0.0.1:5280"
[log]
level = "info"
format = "text"
"#,
        d = dir.path().display()
    );
    let checked = resolve(&with_file(&dir, &text)).unwrap();
    assert_eq!(checked.config.tls.certificates.len(), 1);
    assert_eq!(
        checked.config.registration.hosts.get("example.org"),
        Some(&RegistrationMode::Closed)
    );
}

#[test]
fn layers_apply_in_order_defaults_file_env_cli() {
    let dir = TempDir::new("layers");
    let file = r#"
[server]
domains = ["file.example"]
node_name = "from-file"
[c2s]
max_stanza_size = 1000
require_tls = false
"#;
    // File only.
    let mut sources = with_file(&dir, file);
    let c = resolve(&sources).unwrap().config;
    assert_eq!(c.server.domains, vec!["file.example"]);
    assert_eq!(c.server.node_name, "from-file");
    assert_eq!(c.c2s.max_stanza_size, 1000);
    assert_eq!(c.c2s.idle_timeout_secs, 600, "untouched keys keep defaults");

    // Environment beats the file, key by key.
    sources.env = env(&[
        ("STARLING_SERVER__DOMAINS", "env.example,env2.example"),
        ("STARLING_C2S__MAX_STANZA_SIZE", "2000"),
        ("STARLING_C2S__REQUIRE_TLS", "true"),
    ]);
    let c = resolve(&sources).unwrap().config;
    assert_eq!(c.server.domains, vec!["env.example", "env2.example"]);
    assert_eq!(c.server.node_name, "from-file");
    assert_eq!(c.c2s.max_stanza_size, 2000);
    assert!(c.c2s.require_tls);

    // Flags beat the environment.
    sources.cli = CliOverrides {
        domains: vec!["cli.example".into()],
        data_dir: Some(PathBuf::from("/srv/x")),
        c2s_listen: vec!["127.0.0.1:0".into()],
        c2s_tls_listen: vec!["127.0.0.1:0".into(), "[::1]:0".into()],
        admin_listen: Some("127.0.0.1:0".into()),
        registration: Some("open".into()),
        log_level: Some("debug".into()),
        registry: RegistryOverrides {
            node_id: Some(3),
            initial_members: vec!["3=r3:5290".into()],
            ..RegistryOverrides::default()
        },
    };
    let checked = resolve(&sources).unwrap();
    assert_eq!(checked.config.registry.node_id, 3);
    assert_eq!(
        checked.registry.initial_members.get(&3).map(String::as_str),
        Some("r3:5290")
    );
    let c = &checked.config;
    assert_eq!(c.server.domains, vec!["cli.example"]);
    assert_eq!(c.server.data_dir, PathBuf::from("/srv/x"));
    assert_eq!(c.c2s.max_stanza_size, 2000);
    assert_eq!(c.registration.mode, RegistrationMode::Open);
    assert_eq!(c.log.level, "debug");
    assert!(checked.log_level_from_cli);

    // Errors in list elements name the layer that set the list.
    sources.cli.domains = vec!["bad domain".into()];
    let errors = errors_of(&sources);
    assert_eq!(paths(&errors), vec!["server.domains[0]"]);
    assert_eq!(errors[0].origin.as_deref(), Some("--domain"));
    assert_eq!(checked.c2s_starttls, vec!["127.0.0.1:0".parse().unwrap()]);
    assert_eq!(checked.c2s_direct_tls.len(), 2);
    assert_eq!(checked.admin, "127.0.0.1:0".parse().unwrap());
}

#[test]
fn environment_values_of_every_kind() {
    let sources = Sources {
        env: env(&[
            ("STARLING_C2S__REQUIRE_TLS", "false"),
            (
                "STARLING_C2S__LISTEN_STARTTLS",
                "[::1]:5222, 127.0.0.1:5222",
            ),
            ("STARLING_C2S__LISTEN_DIRECT_TLS", r#"["127.0.0.1:5223"]"#),
            ("STARLING_SERVER__NODE_NAME", "42"),
            ("STARLING_SERVER__DOMAINS", "a.example"),
            ("STARLING_REGISTRATION__MODE", "closed"),
            (
                "STARLING_REGISTRATION__HOSTS",
                r#"{ "a.example" = "open" }"#,
            ),
            ("STARLING_LOG__FORMAT", "json"),
            ("STARLING_AUTH__SCRAM_ITERATIONS", "10000"),
            ("UNRELATED", "x"),
            ("STARLING_CONFIG", "ignored.toml"),
        ]),
        ..Sources::default()
    };
    let checked = resolve(&sources).unwrap();
    let c = &checked.config;
    assert!(!c.c2s.require_tls);
    assert_eq!(checked.c2s_starttls.len(), 2);
    assert_eq!(
        checked.c2s_direct_tls,
        vec!["127.0.0.1:5223".parse().unwrap()]
    );
    assert_eq!(c.server.node_name, "42");
    assert_eq!(c.server.domains, vec!["a.example"]);
    assert_eq!(c.registration.mode, RegistrationMode::Closed);
    assert_eq!(
        c.registration.hosts.get("a.example"),
        Some(&RegistrationMode::Open)
    );
    assert_eq!(c.log.format, LogFormat::Json);
    assert_eq!(c.auth.scram_iterations, 10000);
}

#[test]
fn unknown_keys_are_refused_by_name() {
    let dir = TempDir::new("unknown");
    let errors = errors_of(&with_file(
        &dir,
        "[c2s]\nlisten = [\"[::]:5222\"]\nrequire_tls = false\n[server]\ndomain = \"x\"\n",
    ));
    assert_eq!(paths(&errors), vec!["c2s.listen", "server.domain"]);
    assert!(errors[0].message.contains("unknown field `listen`"));
    assert!(errors[1].message.contains("unknown field `domain`"));
    assert!(
        errors[0]
            .origin
            .as_deref()
            .unwrap()
            .ends_with("starling.toml")
    );

    let errors = errors_of(&with_file(&dir, "[database]\nurl = \"x\"\n"));
    assert_eq!(paths(&errors), vec!["database"]);
    assert!(errors[0].message.contains("unknown section `database`"));

    let errors = errors_of(&Sources {
        env: env(&[("STARLING_C2S__REQUIRE_TSL", "false")]),
        ..Sources::default()
    });
    assert_eq!(paths(&errors), vec!["c2s.require_tsl"]);
    assert_eq!(
        errors[0].origin.as_deref(),
        Some("STARLING_C2S__REQUIRE_TSL")
    );
    assert_eq!(
        errors[0].to_string(),
        "c2s.require_tsl (from STARLING_C2S__REQUIRE_TSL): unknown field `require_tsl`, \
         expected one of `listen_starttls`, `listen_direct_tls`, `require_tls`, \
         `max_stanza_size`, `max_connections_per_ip`, `preauth_timeout_secs`, \
         `idle_timeout_secs`, `keepalive_interval_secs`, `rate_bytes_per_sec`, \
         `rate_burst_bytes`, `outbound_queue_stanzas`, `sm_max_resume_secs`, \
         `sm_ack_every_stanzas`, `sm_ack_every_secs`, `sm_max_unacked_stanzas`, \
         `sm_max_unacked_bytes`, `csi_max_held`"
    );
}

#[test]
fn ill_typed_values_name_their_key_and_layer() {
    let dir = TempDir::new("types");
    let mut sources = with_file(
        &dir,
        "[c2s]\nmax_stanza_size = \"big\"\nrequire_tls = \"yes\"\n[registration]\nmode = \"sometimes\"\nhosts = { \"localhost\" = \"maybe\" }\n[log]\nformat = \"xml\"\n",
    );
    sources.env = env(&[("STARLING_AUTH__SCRAM_ITERATIONS", "-1")]);
    let errors = errors_of(&sources);
    assert_eq!(
        paths(&errors),
        vec![
            "auth.scram_iterations",
            "c2s.max_stanza_size",
            "c2s.require_tls",
            "log.format",
            "registration.hosts.localhost",
            "registration.mode",
        ]
    );
    assert_eq!(
        errors[0].origin.as_deref(),
        Some("STARLING_AUTH__SCRAM_ITERATIONS")
    );
    assert!(errors[5].message.contains("unknown variant `sometimes`"));
}

#[test]
fn malformed_environment_names_are_reported() {
    let errors = errors_of(&Sources {
        env: env(&[("STARLING_C2S_REQUIRE_TLS", "false")]),
        ..Sources::default()
    });
    assert_eq!(errors.len(), 1);
    assert_eq!(
        errors[0].origin.as_deref(),
        Some("STARLING_C2S_REQUIRE_TLS")
    );
    assert!(errors[0].message.contains("STARLING_C2S__REQUIRE_TLS"));
}

#[test]
fn each_validation_error() {
    let dir = TempDir::new("validation");
    let cases: &[(&str, &str, &str)] = &[
        ("[server]\ndomains = []", "server.domains", "at least one"),
        (
            "[server]\ndomains = [\"bad domain!\"]",
            "server.domains[0]",
            "not a valid domain",
        ),
        (
            "[server]\ndomains = [\"user@example.org\"]",
            "server.domains[0]",
            "not a valid domain",
        ),
        (
            "[server]\ndomains = [\"a.example\", \"A.example\"]",
            "server.domains[1]",
            "more than once",
        ),
        ("[server]\ndata_dir = \"\"", "server.data_dir", "empty"),
        ("[server]\nnode_name = \"\"", "server.node_name", "1 to 255"),
        (
            "[server]\nnode_name = \"a b\"",
            "server.node_name",
            "whitespace",
        ),
        (
            "[c2s]\nlisten_starttls = [\"localhost:5222\"]",
            "c2s.listen_starttls[0]",
            "not an IP address",
        ),
        (
            "[c2s]\nlisten_direct_tls = [\"127.0.0.1:5223\", \"nope\"]",
            "c2s.listen_direct_tls[1]",
            "not an IP address",
        ),
        (
            "[c2s]\nlisten_starttls = []\nlisten_direct_tls = []",
            "c2s.listen_starttls",
            "no client listener",
        ),
        (
            "[c2s]\nlisten_starttls = [\"127.0.0.1:5222\"]\nlisten_direct_tls = [\"127.0.0.1:5222\"]",
            "c2s.listen_direct_tls",
            "also used by c2s.listen_starttls",
        ),
        (
            "[admin]\nlisten = \"127.0.0.1\"",
            "admin.listen",
            "not an IP address",
        ),
        (
            "[registration]\nhosts = { \"other.example\" = \"open\" }",
            "registration.hosts.\"other.example\"",
            "not a served domain",
        ),
        (
            "[registration]\nhosts = { \"not a domain\" = \"open\" }",
            "registration.hosts.\"not a domain\"",
            "not a valid domain",
        ),
        (
            "[tls]\ncertificates = [{ cert = \"/nonexistent/c.pem\", key = \"/nonexistent/k.pem\" }]",
            "tls.certificates[0].cert",
            "cannot read",
        ),
        ("[log]\nlevel = \"verbose\"", "log.level", "not a level"),
        ("[log]\nlevel = \"\"", "log.level", "empty"),
        ("[log]\nlevel = \"=debug\"", "log.level", "no target"),
    ];
    for (text, path, needle) in cases {
        let errors = errors_of(&with_file(&dir, text));
        let found = errors.iter().find(|e| e.path == *path);
        let Some(found) = found else {
            panic!("{text:?}: no error at {path}, got {errors:?}");
        };
        assert!(
            found.message.contains(needle),
            "{text:?}: {found} does not mention {needle:?}"
        );
    }

    let sizes = [
        "c2s.max_stanza_size",
        "c2s.max_connections_per_ip",
        "c2s.preauth_timeout_secs",
        "c2s.idle_timeout_secs",
        "c2s.keepalive_interval_secs",
        "c2s.rate_bytes_per_sec",
        "c2s.rate_burst_bytes",
        "c2s.outbound_queue_stanzas",
        "tls.reload_check_secs",
        "auth.scram_iterations",
        "auth.failures_per_minute_per_ip",
        "auth.failures_per_minute_per_account",
    ];
    for key in sizes {
        let (section, name) = key.split_once('.').unwrap();
        let errors = errors_of(&with_file(&dir, &format!("[{section}]\n{name} = 0\n")));
        assert_eq!(paths(&errors), vec![key]);
        assert_eq!(errors[0].message, "must be greater than 0");
    }
}

#[test]
fn every_error_is_reported_at_once() {
    let dir = TempDir::new("all");
    let errors = errors_of(&with_file(
        &dir,
        r#"
[server]
domains = ["ok.example", "bad domain"]
colour = "blue"
[c2s]
max_stanza_size = 0
idle_timeout_secs = "long"
listen_starttls = ["nowhere"]
[registration]
hosts = { "elsewhere.example" = "open" }
[admin]
listen = "x"
"#,
    ));
    assert_eq!(
        paths(&errors),
        vec![
            "c2s.idle_timeout_secs",
            "server.colour",
            "server.domains[1]",
            "c2s.listen_starttls[0]",
            "c2s.max_stanza_size",
            "registration.hosts.\"elsewhere.example\"",
            "admin.listen",
        ]
    );
    let shown = ConfigErrors(errors).to_string();
    assert!(
        shown.starts_with("invalid configuration (7 errors):"),
        "{shown}"
    );
}

#[test]
fn unreadable_or_invalid_files_stop_early() {
    let dir = TempDir::new("files");
    let errors = errors_of(&Sources {
        file: Some(dir.path().join("missing.toml")),
        ..Sources::default()
    });
    assert_eq!(errors.len(), 1);
    assert!(errors[0].message.contains("cannot read"));

    let errors = errors_of(&with_file(&dir, "[server\n"));
    assert_eq!(errors.len(), 1);
    assert!(errors[0].message.contains("not valid TOML"));
    assert!(errors[0].message.contains("line 1"));

    let errors = errors_of(&with_file(&dir, "server = 3\n"));
    assert_eq!(paths(&errors), vec!["server"]);
    assert!(errors[0].message.contains("must be a table"));
}

#[test]
fn domains_are_normalised() {
    let sources = Sources {
        cli: CliOverrides {
            domains: vec!["Example.ORG".into()],
            ..CliOverrides::default()
        },
        env: env(&[(
            "STARLING_REGISTRATION__HOSTS",
            r#"{ "EXAMPLE.org" = "closed" }"#,
        )]),
        ..Sources::default()
    };
    let c = resolve(&sources).unwrap().config;
    assert_eq!(c.server.domains, vec!["example.org"]);
    assert_eq!(
        c.registration.hosts.get("example.org"),
        Some(&RegistrationMode::Closed)
    );
}

#[test]
fn the_printed_configuration_reads_back_identically() {
    let dir = TempDir::new("roundtrip");
    std::fs::write(dir.path().join("c.pem"), "x").unwrap();
    let mut config = Config::default();
    config.tls.certificates.push(CertificatePair {
        cert: dir.path().join("c.pem"),
        key: dir.path().join("c.pem"),
    });
    config
        .registration
        .hosts
        .insert("localhost".into(), RegistrationMode::Open);
    let text = config.to_toml().unwrap();
    let checked = resolve(&with_file(&dir, &text)).unwrap();
    assert_eq!(checked.config, config);
}

#[test]
fn config_md_documents_every_key() {
    let doc = include_str!("../../../../README.md");
    let defaults = layers::default_table();
    for (section, keys) in &defaults {
        let keys = keys.as_table().unwrap();
        assert!(doc.contains(&format!("[{section}]")), "section {section}");
        for key in keys.keys() {
            assert!(
                doc.contains(&format!("`{section}.{key}`")),
                "README.md lacks `{section}.{key}`"
            );
            let env = format!(
                "STARLING_{}__{}",
                section.to_ascii_uppercase(),
                key.to_ascii_uppercase()
            );
            assert!(doc.contains(&env), "README.md lacks {env}");
        }
    }
}
