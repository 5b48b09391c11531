//! Accounts for a run: generated names (`PREFIX0`, `PREFIX1`... on the target domain, one per
//! simulated device) or a file of `jid password` lines.

use crate::load::client::Account;

/// `count` accounts `prefix{first}`.. with one password.
pub fn generated(prefix: &str, first: u64, count: u64, password: &str) -> Vec<Account> {
    (first..first.saturating_add(count))
        .map(|i| Account::new(format!("{prefix}{i}"), password))
        .collect()
}

/// Parses `jid password` lines (blank lines and `#` comments skipped). The JID's domain must
/// be `domain`; only its localpart is used.
pub fn parse_file(text: &str, domain: &str) -> Result<Vec<Account>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (jid, password) = line
            .split_once(char::is_whitespace)
            .ok_or_else(|| format!("line {}: expected `jid password`", n + 1))?;
        let (local, host) = jid
            .split_once('@')
            .ok_or_else(|| format!("line {}: `{jid}` has no localpart", n + 1))?;
        let host = host.split('/').next().unwrap_or(host);
        if !host.eq_ignore_ascii_case(domain) {
            return Err(format!(
                "line {}: `{jid}` is not on the target domain {domain}",
                n + 1
            ));
        }
        out.push(Account::new(local, password.trim()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_and_parses() {
        let a = generated("load", 3, 2, "pw");
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].user, "load3");
        assert_eq!(a[1].user, "load4");
        let f = parse_file(
            "# c\n\nalice@example.test s3cret\nbob@EXAMPLE.test pw two\n",
            "example.test",
        )
        .unwrap();
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].user, "alice");
        assert_eq!(f[1].password, "pw two");
        assert!(parse_file("alice@other.test pw", "example.test").is_err());
        assert!(parse_file("alice", "example.test").is_err());
    }
}
