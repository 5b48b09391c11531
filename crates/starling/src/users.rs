//! `starling user add|passwd|del|list`: account administration straight on the store file.
//!
//! Passwords never reach the store: each is turned into SCRAM credentials (RFC 5802 §3,
//! RFC 7677) for SHA-1, SHA-256 and SHA-512, each with its own random salt, and only those are
//! written. The store file is locked by whichever process has it open, so these commands
//! refuse to run while `starling serve` uses the same data directory.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use starling_sasl::{HashAlgo, ScramCredentials, derive_credentials, new_salt};
use starling_store::{AccountStore, BareUser, RedbStore, StoreError};

use crate::cli::{PasswordArgs, UserCommand};
use crate::config::Checked;

/// The store file inside the data directory.
pub(crate) const STORE_FILE: &str = "starling.redb";

/// Why a user command failed; shown to the operator as it is.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UserError {
    #[error("`{0}` is not a valid bare JID ({1})")]
    BadJid(String, String),
    #[error("`{0}` has no localpart: accounts are `name@domain`")]
    NoLocalpart(String),
    #[error("`{0}` is not a valid domain ({1})")]
    BadDomain(String, String),
    #[error("domain `{0}` is not served by this configuration (server.domains = {1:?})")]
    NotServed(String, Vec<String>),
    #[error("no store at {0}: nothing to change (create accounts with `starling user add`)")]
    NoStore(PathBuf),
    #[error(
        "the store {0} is in use by another process (is `starling serve` running with this data \
         directory?): stop it first"
    )]
    Locked(PathBuf),
    #[error("account {0} already exists")]
    Exists(String),
    #[error("no account {0}")]
    NotFound(String),
    #[error("cannot read the password from standard input: {0}")]
    Stdin(std::io::Error),
    #[error("the password is empty")]
    EmptyPassword,
    #[error("the password cannot be used: {0}")]
    Password(String),
    #[error("cannot create the data directory {0}: {1}")]
    DataDir(PathBuf, std::io::Error),
    #[error("store error: {0}")]
    Store(StoreError),
    #[error("cannot write to standard output: {0}")]
    Stdout(std::io::Error),
}

/// Runs one user command against the store of `checked`'s data directory.
pub(crate) async fn run(
    command: UserCommand,
    checked: &Checked,
    stdin: &mut dyn BufRead,
    stdout: &mut dyn Write,
) -> Result<(), UserError> {
    let config = &checked.config;
    let path = config.server.data_dir.join(STORE_FILE);
    let iterations = config.auth.scram_iterations;
    match command {
        UserCommand::Add { jid, password } => {
            let user = served_user(&jid, &config.server.domains)?;
            let password = read_password(&password, stdin)?;
            crate::runfiles::create_private_dir(&config.server.data_dir)
                .map_err(|e| UserError::DataDir(config.server.data_dir.clone(), e))?;
            let store = open(&path, true).await?;
            let credentials = credentials(password, iterations).await?;
            store
                .create(&user, credentials)
                .await
                .map_err(|e| match e {
                    StoreError::Conflict => UserError::Exists(user.to_string()),
                    other => UserError::Store(other),
                })?;
            tracing::info!(user = %user, "account created");
            writeln!(stdout, "created {user}").map_err(UserError::Stdout)
        }
        UserCommand::Passwd { jid, password } => {
            let user = served_user(&jid, &config.server.domains)?;
            let password = read_password(&password, stdin)?;
            let store = open(&path, false).await?;
            if !store.exists(&user).await.map_err(UserError::Store)? {
                return Err(UserError::NotFound(user.to_string()));
            }
            let credentials = credentials(password, iterations).await?;
            store
                .set_credentials(&user, credentials)
                .await
                .map_err(|e| not_found(e, &user))?;
            tracing::info!(user = %user, "password changed");
            writeln!(stdout, "password changed for {user}").map_err(UserError::Stdout)
        }
        UserCommand::Del { jid } => {
            let user = parse_user(&jid)?;
            let store = open(&path, false).await?;
            store.delete(&user).await.map_err(|e| not_found(e, &user))?;
            tracing::info!(user = %user, "account deleted");
            writeln!(stdout, "deleted {user}").map_err(UserError::Stdout)
        }
        UserCommand::List { domain } => {
            let domain = starling_xmpp::jid::parse_domain(&domain)
                .map_err(|e| UserError::BadDomain(domain.clone(), e.to_string()))?;
            let domain = domain.as_str();
            let store = open(&path, false).await?;
            for localpart in store.list(domain).await.map_err(UserError::Store)? {
                writeln!(stdout, "{localpart}@{domain}").map_err(UserError::Stdout)?;
            }
            Ok(())
        }
    }
}

fn not_found(e: StoreError, user: &BareUser) -> UserError {
    match e {
        StoreError::NotFound => UserError::NotFound(user.to_string()),
        other => UserError::Store(other),
    }
}

/// A bare JID with a localpart, normalised as the server will see it at login.
fn parse_user(jid: &str) -> Result<BareUser, UserError> {
    let bare = starling_xmpp::jid::parse_bare(jid)
        .map_err(|e| UserError::BadJid(jid.to_owned(), e.to_string()))?;
    let Some(node) = bare.node() else {
        return Err(UserError::NoLocalpart(jid.to_owned()));
    };
    Ok(BareUser::new(bare.domain().as_str(), node.as_str()))
}

fn served_user(jid: &str, domains: &[String]) -> Result<BareUser, UserError> {
    let user = parse_user(jid)?;
    if !domains.iter().any(|d| d == user.domain()) {
        return Err(UserError::NotServed(
            user.domain().to_owned(),
            domains.to_vec(),
        ));
    }
    Ok(user)
}

fn read_password(args: &PasswordArgs, stdin: &mut dyn BufRead) -> Result<String, UserError> {
    let password = match &args.password {
        Some(p) => p.clone(),
        None => {
            let mut line = String::new();
            stdin.read_line(&mut line).map_err(UserError::Stdin)?;
            let trimmed = line.trim_end_matches(['\n', '\r']).len();
            line.truncate(trimmed);
            line
        }
    };
    if password.is_empty() {
        return Err(UserError::EmptyPassword);
    }
    Ok(password)
}

/// SCRAM credentials for every hash, each with a fresh salt. PBKDF2 is slow on purpose, so it
/// runs on the blocking pool.
async fn credentials(
    password: String,
    iterations: u32,
) -> Result<Vec<ScramCredentials>, UserError> {
    tokio::task::spawn_blocking(move || {
        HashAlgo::ALL
            .iter()
            .map(|&hash| {
                let salt = new_salt().map_err(|e| UserError::Password(e.to_string()))?;
                derive_credentials(hash, &password, &salt, iterations)
                    .map_err(|e| UserError::Password(e.to_string()))
            })
            .collect()
    })
    .await
    .map_err(|e| UserError::Password(format!("derivation task failed: {e}")))?
}

/// Opens the store, telling a locked file (another process has it) from other failures.
pub(crate) async fn open(path: &Path, create: bool) -> Result<RedbStore, UserError> {
    if !create && !path.exists() {
        return Err(UserError::NoStore(path.to_path_buf()));
    }
    let owned = path.to_path_buf();
    let result = tokio::task::spawn_blocking(move || RedbStore::open(&owned))
        .await
        .map_err(|e| UserError::Store(StoreError::Backend(e.to_string())))?;
    result.map_err(|e| {
        if is_locked(&e) {
            UserError::Locked(path.to_path_buf())
        } else {
            UserError::Store(e)
        }
    })
}

/// redb reports a file locked by another process as "Database already open".
pub(crate) fn is_locked(e: &StoreError) -> bool {
    matches!(e, StoreError::Backend(m) if m.contains("already open"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CliOverrides, Sources, resolve};
    use crate::testutil::TempDir;

    fn checked(dir: &Path) -> Checked {
        resolve(&Sources {
            cli: CliOverrides {
                data_dir: Some(dir.to_path_buf()),
                domains: vec!["localhost".into(), "example.org".into()],
                ..CliOverrides::default()
            },
            ..Sources::default()
        })
        .unwrap()
    }

    async fn run_cmd(c: &Checked, cmd: UserCommand, input: &str) -> Result<String, UserError> {
        let mut out = Vec::new();
        run(cmd, c, &mut input.as_bytes(), &mut out).await?;
        Ok(String::from_utf8(out).unwrap())
    }

    fn stdin_password() -> PasswordArgs {
        PasswordArgs {
            password_stdin: true,
            password: None,
        }
    }

    #[tokio::test]
    async fn add_passwd_list_del() {
        let dir = TempDir::new("users");
        let c = checked(dir.path());
        let add = |jid: &str| UserCommand::Add {
            jid: jid.into(),
            password: stdin_password(),
        };
        assert_eq!(
            run_cmd(&c, add("Alice@LocalHost"), "secret\r\n")
                .await
                .unwrap(),
            "created alice@localhost\n"
        );
        assert!(matches!(
            run_cmd(&c, add("alice@localhost"), "x\n").await,
            Err(UserError::Exists(_))
        ));
        run_cmd(&c, add("bob@localhost"), "pw").await.unwrap();
        run_cmd(&c, add("carol@example.org"), "pw").await.unwrap();
        assert!(matches!(
            run_cmd(&c, add("dave@elsewhere.example"), "pw").await,
            Err(UserError::NotServed(..))
        ));
        assert!(matches!(
            run_cmd(&c, add("localhost"), "pw").await,
            Err(UserError::NoLocalpart(_))
        ));
        assert!(matches!(
            run_cmd(&c, add("a@localhost/res"), "pw").await,
            Err(UserError::BadJid(..))
        ));
        assert!(matches!(
            run_cmd(&c, add("eve@localhost"), "\n").await,
            Err(UserError::EmptyPassword)
        ));

        let list = UserCommand::List {
            domain: "LOCALHOST".into(),
        };
        assert_eq!(
            run_cmd(&c, list, "").await.unwrap(),
            "alice@localhost\nbob@localhost\n"
        );

        // The stored credentials check against the password given, for every hash.
        let store = open(&dir.path().join(STORE_FILE), false).await.unwrap();
        let alice = BareUser::new("localhost", "alice");
        for hash in HashAlgo::ALL {
            let creds = store.credentials(&alice, hash).await.unwrap().unwrap();
            assert_eq!(creds.iterations, 4096);
            assert!(starling_sasl::verify_plain_password(&creds, "secret"));
        }
        // While this process holds the store, another open is refused as locked.
        assert!(matches!(
            run_cmd(
                &c,
                UserCommand::List {
                    domain: "localhost".into()
                },
                ""
            )
            .await,
            Err(UserError::Locked(_))
        ));
        drop(store);

        let passwd = UserCommand::Passwd {
            jid: "alice@localhost".into(),
            password: PasswordArgs {
                password_stdin: false,
                password: Some("new".into()),
            },
        };
        run_cmd(&c, passwd, "").await.unwrap();
        {
            let store = open(&dir.path().join(STORE_FILE), false).await.unwrap();
            let creds = store
                .credentials(&alice, HashAlgo::Sha256)
                .await
                .unwrap()
                .unwrap();
            assert!(starling_sasl::verify_plain_password(&creds, "new"));
            assert!(!starling_sasl::verify_plain_password(&creds, "secret"));
        }
        assert!(matches!(
            run_cmd(
                &c,
                UserCommand::Passwd {
                    jid: "nobody@localhost".into(),
                    password: stdin_password()
                },
                "pw"
            )
            .await,
            Err(UserError::NotFound(_))
        ));

        let del = |jid: &str| UserCommand::Del { jid: jid.into() };
        assert_eq!(
            run_cmd(&c, del("bob@localhost"), "").await.unwrap(),
            "deleted bob@localhost\n"
        );
        assert!(matches!(
            run_cmd(&c, del("bob@localhost"), "").await,
            Err(UserError::NotFound(_))
        ));
        assert_eq!(
            run_cmd(
                &c,
                UserCommand::List {
                    domain: "localhost".into()
                },
                ""
            )
            .await
            .unwrap(),
            "alice@localhost\n"
        );
    }

    #[tokio::test]
    async fn commands_other_than_add_need_an_existing_store() {
        let dir = TempDir::new("nostore");
        let c = checked(&dir.path().join("absent"));
        assert!(matches!(
            run_cmd(
                &c,
                UserCommand::List {
                    domain: "localhost".into()
                },
                ""
            )
            .await,
            Err(UserError::NoStore(_))
        ));
        assert!(!dir.path().join("absent").exists());
    }
}
