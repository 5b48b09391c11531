//! The command line (clap derive). Flags that change configuration keys are gathered in
//! [`Overrides`] and become the last configuration layer.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{CliOverrides, ENV_PREFIX, RegistryOverrides, Sources};

/// Starling: a clustered XMPP server. `starling serve` runs a complete single-node server.
#[derive(Debug, Parser)]
#[command(name = "starling", version)]
pub(crate) struct Cli {
    /// TOML configuration file. Without one, the built-in defaults apply, then
    /// `STARLING_<SECTION>__<KEY>` environment variables, then flags.
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "STARLING_CONFIG",
        hide_env_values = true
    )]
    pub(crate) config: Option<PathBuf>,

    /// Data directory: store, secret, generated certificates, run files
    /// (overrides `server.data_dir`).
    #[arg(long, global = true, value_name = "DIR")]
    pub(crate) data_dir: Option<PathBuf>,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the server: edge, router and session registry in one process, with the embedded
    /// store. Stops gracefully on SIGINT or SIGTERM; reloads certificates on SIGHUP.
    Serve(ServeArgs),
    /// Manage accounts in the store. Must not run while `starling serve` holds the same data
    /// directory open (the store file is locked).
    #[command(subcommand)]
    User(UserCommand),
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Run a node of the replicated session registry (`[registry]`), or manage the members
    /// of a running registry cluster (`starling registry members ...`).
    Registry(RegistryArgs),
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct RegistryArgs {
    #[command(subcommand)]
    pub(crate) command: Option<RegistryCommand>,
    #[command(flatten)]
    pub(crate) node: RegistryNodeArgs,
}

/// Flags of `starling registry` (running a node) that override configuration keys.
#[derive(Debug, Args, Default)]
pub(crate) struct RegistryNodeArgs {
    /// The gRPC listen address (replaces `registry.listen`).
    #[arg(long, value_name = "ADDR")]
    pub(crate) listen: Option<String>,
    /// The `host:port` peers and clients use (replaces `registry.advertise`).
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) advertise: Option<String>,
    /// This member's id (replaces `registry.node_id`).
    #[arg(long = "node-id", value_name = "ID")]
    pub(crate) node_id: Option<u64>,
    /// `ID=HOST:PORT` of a member of a new cluster; repeat for each (replaces
    /// `registry.initial_members`).
    #[arg(long = "initial-member", value_name = "ID=HOST:PORT")]
    pub(crate) initial_members: Vec<String>,
    /// Number of shards of a new cluster (replaces `registry.shards`).
    #[arg(long, value_name = "N")]
    pub(crate) shards: Option<u32>,
    /// The admin HTTP listener address (replaces `admin.listen`).
    #[arg(long = "admin-listen", value_name = "ADDR")]
    pub(crate) admin_listen: Option<String>,
    /// Log filter (replaces `log.level`; beats `RUST_LOG`).
    #[arg(long = "log-level", value_name = "FILTER")]
    pub(crate) log_level: Option<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum RegistryCommand {
    /// List, add or remove the members of a running registry cluster.
    Members(MembersArgs),
}

#[derive(Debug, Args)]
pub(crate) struct MembersArgs {
    /// A registry member to ask (`host:port`); repeat for several. Default: this node's
    /// `registry.advertise` and the `registry.initial_members`.
    #[arg(long = "seed", value_name = "HOST:PORT", global = true)]
    pub(crate) seeds: Vec<String>,
    /// How long a membership change may take, in seconds (each shard waits for a new member
    /// to catch up).
    #[arg(long, value_name = "SECS", default_value_t = 120, global = true)]
    pub(crate) timeout: u64,
    #[command(subcommand)]
    pub(crate) action: MembersAction,
}

#[derive(Debug, Subcommand)]
pub(crate) enum MembersAction {
    /// Print every shard's voters, learners, leader, term and indexes.
    List,
    /// Add a running node (started with no initial members) to every shard: as a learner,
    /// then, once caught up, as a voter.
    Add {
        /// Its member id (never used before in this cluster).
        id: u64,
        /// Its `host:port`.
        addr: String,
    },
    /// Remove a member from every shard (a dead one too; replace it by adding a new node
    /// with a new id).
    Remove {
        /// Its member id.
        id: u64,
    },
}

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    pub(crate) overrides: Overrides,
}

/// Flags that override configuration keys.
#[derive(Debug, Args, Default)]
pub(crate) struct Overrides {
    /// A domain to serve; repeat for several (replaces `server.domains`).
    #[arg(long = "domain", value_name = "DOMAIN")]
    pub(crate) domains: Vec<String>,
    /// A STARTTLS client listener address; repeat for several (replaces
    /// `c2s.listen_starttls`). Port 0 picks a free port.
    #[arg(long = "c2s-listen", value_name = "ADDR")]
    pub(crate) c2s_listen: Vec<String>,
    /// A direct-TLS client listener address; repeat for several (replaces
    /// `c2s.listen_direct_tls`).
    #[arg(long = "c2s-tls-listen", value_name = "ADDR")]
    pub(crate) c2s_tls_listen: Vec<String>,
    /// The admin HTTP listener address (replaces `admin.listen`).
    #[arg(long = "admin-listen", value_name = "ADDR")]
    pub(crate) admin_listen: Option<String>,
    /// Who may register accounts in-band (replaces `registration.mode`).
    #[arg(long, value_name = "MODE", value_parser = ["open", "closed", "loopback"])]
    pub(crate) registration: Option<String>,
    /// Log filter, e.g. `debug` or `starling_edge=trace,info` (replaces `log.level`; beats
    /// `RUST_LOG`).
    #[arg(long = "log-level", value_name = "FILTER")]
    pub(crate) log_level: Option<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum UserCommand {
    /// Create an account.
    Add {
        /// The account's bare JID, e.g. `alice@localhost`.
        jid: String,
        #[command(flatten)]
        password: PasswordArgs,
    },
    /// Change an account's password.
    Passwd {
        /// The account's bare JID.
        jid: String,
        #[command(flatten)]
        password: PasswordArgs,
    },
    /// Delete an account and all of its data (roster, offline messages, vCard, private XML).
    Del {
        /// The account's bare JID.
        jid: String,
    },
    /// List the accounts of a domain, one JID per line.
    List {
        /// The domain.
        domain: String,
    },
}

/// Where the password comes from; there is no interactive prompt.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub(crate) struct PasswordArgs {
    /// Read the password from the first line of standard input.
    #[arg(long)]
    pub(crate) password_stdin: bool,
    /// The password itself (visible to other local users in the process list: prefer
    /// `--password-stdin`).
    #[arg(long, value_name = "PASSWORD")]
    pub(crate) password: Option<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ConfigCommand {
    /// Validate the configuration without starting anything: prints the effective
    /// configuration as TOML (exit 0) or every error found (exit 1).
    Check(CheckArgs),
}

#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    #[command(flatten)]
    pub(crate) overrides: Overrides,
}

impl Cli {
    /// The configuration layers this invocation names, with the process environment.
    pub(crate) fn sources(&self, overrides: Option<&Overrides>) -> Sources {
        let empty = Overrides::default();
        let o = overrides.unwrap_or(&empty);
        Sources {
            file: self.config.clone(),
            env: std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .filter(|(k, _)| k.starts_with(ENV_PREFIX))
                .collect(),
            cli: CliOverrides {
                data_dir: self.data_dir.clone(),
                domains: o.domains.clone(),
                c2s_listen: o.c2s_listen.clone(),
                c2s_tls_listen: o.c2s_tls_listen.clone(),
                admin_listen: o.admin_listen.clone(),
                registration: o.registration.clone(),
                log_level: o.log_level.clone(),
                registry: RegistryOverrides::default(),
            },
        }
    }

    /// The configuration layers of `starling registry`.
    pub(crate) fn registry_sources(&self, args: &RegistryArgs) -> Sources {
        let mut sources = self.sources(None);
        let n = &args.node;
        sources.cli.admin_listen.clone_from(&n.admin_listen);
        sources.cli.log_level.clone_from(&n.log_level);
        sources.cli.registry = RegistryOverrides {
            listen: n.listen.clone(),
            advertise: n.advertise.clone(),
            node_id: n.node_id,
            initial_members: n.initial_members.clone(),
            shards: n.shards,
        };
        sources
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_flags_and_global_options() {
        let cli = Cli::try_parse_from([
            "starling",
            "serve",
            "--config",
            "s.toml",
            "--data-dir",
            "/tmp/d",
            "--domain",
            "a.example",
            "--domain",
            "b.example",
            "--c2s-listen",
            "127.0.0.1:0",
            "--c2s-tls-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--registration",
            "open",
            "--log-level",
            "debug",
        ])
        .unwrap();
        let Command::Serve(args) = &cli.command else {
            panic!("expected serve");
        };
        let sources = cli.sources(Some(&args.overrides));
        assert_eq!(sources.file, Some(PathBuf::from("s.toml")));
        assert_eq!(sources.cli.data_dir, Some(PathBuf::from("/tmp/d")));
        assert_eq!(sources.cli.domains, vec!["a.example", "b.example"]);
        assert_eq!(sources.cli.registration.as_deref(), Some("open"));
        assert!(Cli::try_parse_from(["starling", "serve", "--registration", "sometimes"]).is_err());
    }

    #[test]
    fn registry_node_flags_and_members_commands() {
        let cli = Cli::try_parse_from([
            "starling",
            "--data-dir",
            "/d",
            "registry",
            "--listen",
            "127.0.0.1:5290",
            "--node-id",
            "2",
            "--initial-member",
            "1=a:1",
            "--initial-member",
            "2=b:2",
        ])
        .unwrap();
        let Command::Registry(args) = &cli.command else {
            panic!("expected registry");
        };
        assert!(args.command.is_none());
        let sources = cli.registry_sources(args);
        assert_eq!(sources.cli.registry.node_id, Some(2));
        assert_eq!(sources.cli.registry.initial_members, ["1=a:1", "2=b:2"]);
        let cli = Cli::try_parse_from([
            "starling", "registry", "members", "add", "4", "d:4", "--seed", "a:1",
        ])
        .unwrap();
        let Command::Registry(RegistryArgs {
            command: Some(RegistryCommand::Members(m)),
            ..
        }) = &cli.command
        else {
            panic!("expected registry members");
        };
        assert_eq!(m.seeds, ["a:1"]);
        assert!(matches!(m.action, MembersAction::Add { id: 4, ref addr } if addr == "d:4"));
        // Node flags do not mix with the members commands.
        assert!(
            Cli::try_parse_from(["starling", "registry", "--node-id", "1", "members", "list"])
                .is_err()
        );
    }

    #[test]
    fn user_commands_need_exactly_one_password_source() {
        assert!(Cli::try_parse_from(["starling", "user", "add", "a@localhost"]).is_err());
        assert!(
            Cli::try_parse_from([
                "starling",
                "user",
                "add",
                "a@localhost",
                "--password",
                "x",
                "--password-stdin"
            ])
            .is_err()
        );
        let cli = Cli::try_parse_from([
            "starling",
            "--data-dir",
            "d",
            "user",
            "passwd",
            "a@localhost",
            "--password-stdin",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::User(UserCommand::Passwd { ref password, .. }) if password.password_stdin
        ));
        assert_eq!(cli.data_dir, Some(PathBuf::from("d")));
    }
}
