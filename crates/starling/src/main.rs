//! `starling`, the server binary: configuration (TOML file, `STARLING_*` environment, flags),
//! `starling serve` (edge + router + in-memory session registry + embedded redb store in one
//! process), `starling registry` (a node of the replicated session registry, and
//! `registry members ...`), account administration (`starling user ...`),
//! `starling config check`, logs, metrics and the admin HTTP endpoint.
//!
//! It sits outside the stanza path: it builds the roles, hands each its settings and links,
//! and owns the process's lifecycle (readiness, signals, graceful shutdown). It must never
//! hold protocol logic, and never let a role outlive the shutdown: every task it starts is
//! owned and joined.

#![forbid(unsafe_code)]

mod admin;
mod cli;
mod config;
mod registry;
mod runfiles;
mod serve;
mod telemetry;
mod users;
mod wiring;

#[cfg(test)]
mod testutil;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command, ConfigCommand, RegistryCommand};
use crate::config::{Checked, resolve};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let sources = match &cli.command {
        Command::Serve(args) => cli.sources(Some(&args.overrides)),
        Command::Config(ConfigCommand::Check(args)) => cli.sources(Some(&args.overrides)),
        Command::User(_) => cli.sources(None),
        Command::Registry(args) => cli.registry_sources(args),
    };
    let checked = match resolve(&sources) {
        Ok(checked) => checked,
        Err(errors) => {
            // `config check` prints the errors as its answer; the others refuse to start.
            if !matches!(cli.command, Command::Config(_)) {
                eprint!("starling: ");
            }
            eprint!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Serve(_) => serve(checked, Role::Serve),
        Command::Registry(args) => match args.command {
            None => serve(checked, Role::Registry),
            Some(RegistryCommand::Members(members)) => report(registry_members(members, &checked)),
        },
        Command::User(command) => report(user(command, &checked)),
        Command::Config(ConfigCommand::Check(_)) => report(print_config(&checked)),
    }
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("starling: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Which long-running process to be.
#[derive(Debug, Clone, Copy)]
enum Role {
    /// `starling serve`.
    Serve,
    /// `starling registry`.
    Registry,
}

/// Runs the server; once logging is up, a failure is reported as a log line (text or JSON,
/// as configured) rather than printed beside it.
fn serve(checked: Checked, role: Role) -> ExitCode {
    if let Err(e) = telemetry::init_tracing(&checked.config.log, checked.log_level_from_cli) {
        return report(Err(e));
    }
    match run_server(checked, role) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "exiting");
            ExitCode::FAILURE
        }
    }
}

fn run_server(checked: Checked, role: Role) -> anyhow::Result<()> {
    let metrics = telemetry::Metrics::install()?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        node = %checked.config.server.node_name,
        data_dir = %checked.config.server.data_dir.display(),
        "starting"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("starling")
        .build()?;
    match role {
        Role::Serve => runtime.block_on(serve::run(checked, metrics)),
        Role::Registry => runtime.block_on(registry::run(checked, metrics)),
    }
}

fn registry_members(args: cli::MembersArgs, checked: &Checked) -> anyhow::Result<()> {
    let runtime = admin_runtime(checked)?;
    let stdout = std::io::stdout();
    runtime.block_on(registry::members(args, checked, &mut stdout.lock()))
}

/// Administration commands are quiet unless asked (warnings only, or `RUST_LOG`) and run on
/// one thread.
fn admin_runtime(checked: &Checked) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut log = checked.config.log.clone();
    log.level = "warn".to_owned();
    telemetry::init_tracing(&log, false)?;
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn user(command: cli::UserCommand, checked: &Checked) -> anyhow::Result<()> {
    let runtime = admin_runtime(checked)?;
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    runtime.block_on(users::run(
        command,
        checked,
        &mut stdin.lock(),
        &mut stdout.lock(),
    ))?;
    Ok(())
}

fn print_config(checked: &Checked) -> anyhow::Result<()> {
    let text = checked.config.to_toml()?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "# effective configuration (defaults, file, environment, flags)"
    )?;
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}
