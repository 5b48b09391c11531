//! Debian's packages of the servers compared: installed with `apt-get` when missing (as root,
//! or the run fails), their versions, and their system services. A package's maintainer
//! scripts may start its service on install; the comparison never measures a system service,
//! so a service that the install started is stopped again (and, under systemd, disabled,
//! since it was installed only to be run privately), and a service that ran before is left
//! alone.

use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use crate::procfs::Proc;

/// The installed version of `package`, or `None`.
pub fn installed_version(package: &str) -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}\t${Version}", package])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (status, version) = text.split_once('\t')?;
    status
        .ends_with("install ok installed")
        .then(|| version.trim().to_owned())
}

/// Pids of processes running as `user`.
pub fn processes_of(user: &str) -> Vec<u32> {
    let Some(uid) = uid_of(user) else {
        return Vec::new();
    };
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    let line = s.lines().find(|l| l.starts_with("Uid:"))?.to_owned();
                    line.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(uid)
        })
        .filter(|&pid| Proc::Pid(pid).name().is_some())
        .collect()
}

fn uid_of(user: &str) -> Option<u32> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == user).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

/// Installs the missing ones of `packages` (`apt-get update` first), then stops any service
/// of theirs that the install started. Fails when a package cannot be installed.
pub fn ensure(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| installed_version(p).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !rustix::process::geteuid().is_root() {
        bail!(
            "{} not installed; run as root so they can be installed with apt-get, or install \
             them (apt-get install {})",
            missing.join(" and "),
            missing.join(" ")
        );
    }
    eprintln!("installing {} from Debian's packages", missing.join(" "));
    let apt = |args: &[&str]| -> anyhow::Result<()> {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        if !status.success() {
            bail!("apt-get {} failed ({status})", args.join(" "));
        }
        Ok(())
    };
    apt(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(missing.iter().copied());
    apt(&args)?;
    for p in &missing {
        if installed_version(p).is_none() {
            bail!("{p} is still not installed after apt-get install");
        }
        // The package's user exists only now, so nothing of its ran before the install.
        if !processes_of(p).is_empty() {
            stop_service(p);
        }
    }
    Ok(())
}

fn stop_service(name: &str) {
    let systemd = std::path::Path::new("/run/systemd/system").exists();
    let run = |cmd: &str, args: &[&str]| {
        let ok = Command::new(cmd)
            .args(args)
            .status()
            .is_ok_and(|s| s.success());
        eprintln!(
            "{} `{cmd} {}`",
            if ok { "ran" } else { "failed:" },
            args.join(" ")
        );
    };
    eprintln!("the {name} package started its system service; stopping it");
    if systemd {
        run("systemctl", &["stop", name]);
        run("systemctl", &["disable", name]);
    } else {
        run("service", &[name, "stop"]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_up_users_and_packages() {
        assert_eq!(uid_of("root"), Some(0));
        assert_eq!(uid_of("no-such-user-here"), None);
        assert!(!processes_of("root").is_empty());
        assert!(installed_version("no-such-package-here").is_none());
    }
}
