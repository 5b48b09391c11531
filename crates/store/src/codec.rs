//! The compact, versioned binary records the store writes.
//!
//! Every record starts with a format byte, so a later release can add fields under a new format
//! while still reading the old one. Integers are big-endian; strings and byte strings are a
//! `u32` length followed by the bytes. Decoding never trusts a length: a record that is short,
//! too long, or inconsistent is [`StoreError::Corrupt`]. Redis values use the same encoding.

use starling_sasl::{HashAlgo, ScramCredentials};

use crate::{LastPresence, RosterItem, StoreError};

/// Format of account records: a credential count, then each credential.
const ACCOUNT_V1: u8 = 1;
/// Format of roster item records.
const ROSTER_ITEM_V1: u8 = 1;
/// Format of last-presence records: the stamp, then the stanza.
const LAST_PRESENCE_V1: u8 = 1;

/// The stable on-disk id of a hash; never renumber.
fn hash_id(hash: HashAlgo) -> u8 {
    match hash {
        HashAlgo::Sha1 => 1,
        HashAlgo::Sha256 => 2,
        HashAlgo::Sha512 => 3,
    }
}

fn hash_from_id(id: u8) -> Option<HashAlgo> {
    match id {
        1 => Some(HashAlgo::Sha1),
        2 => Some(HashAlgo::Sha256),
        3 => Some(HashAlgo::Sha512),
        _ => None,
    }
}

/// The account record: the user's SCRAM credentials, at most one per hash.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct AccountRecord {
    pub(crate) credentials: Vec<ScramCredentials>,
}

impl AccountRecord {
    /// Builds a record from credentials, keeping the last one given for each hash.
    pub(crate) fn new(credentials: Vec<ScramCredentials>) -> Self {
        let mut kept: Vec<ScramCredentials> = Vec::with_capacity(credentials.len());
        for c in credentials {
            kept.retain(|k| k.hash != c.hash);
            kept.push(c);
        }
        kept.sort_by_key(|c| c.hash);
        AccountRecord { credentials: kept }
    }

    pub(crate) fn credentials(&self, hash: HashAlgo) -> Option<&ScramCredentials> {
        self.credentials.iter().find(|c| c.hash == hash)
    }

    pub(crate) fn encode(&self) -> Result<Vec<u8>, StoreError> {
        let mut w = Writer::new(ACCOUNT_V1);
        w.u8(u8::try_from(self.credentials.len())
            .map_err(|_| StoreError::InvalidInput("too many credentials".into()))?);
        for c in &self.credentials {
            if !c.is_well_formed() {
                return Err(StoreError::InvalidInput(format!(
                    "malformed {} credentials",
                    c.hash.name()
                )));
            }
            w.u8(hash_id(c.hash));
            w.u32(c.iterations);
            w.bytes(&c.salt)?;
            w.bytes(&c.stored_key)?;
            w.bytes(&c.server_key)?;
        }
        Ok(w.finish())
    }

    pub(crate) fn decode(data: &[u8]) -> Result<Self, StoreError> {
        let mut r = Reader::new(data, "account")?;
        match r.format {
            ACCOUNT_V1 => {}
            other => return Err(r.corrupt_format(other)),
        }
        let n = r.u8()?;
        let mut credentials = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            let id = r.u8()?;
            let hash = hash_from_id(id)
                .ok_or_else(|| StoreError::Corrupt(format!("account: unknown hash id {id}")))?;
            let c = ScramCredentials {
                hash,
                iterations: r.u32()?,
                salt: r.bytes()?.to_vec(),
                stored_key: r.bytes()?.to_vec(),
                server_key: r.bytes()?.to_vec(),
            };
            if !c.is_well_formed() {
                return Err(StoreError::Corrupt(format!(
                    "account: malformed {} credentials",
                    hash.name()
                )));
            }
            credentials.push(c);
        }
        r.end()?;
        Ok(AccountRecord { credentials })
    }
}

impl RosterItem {
    pub(crate) fn encode(&self) -> Result<Vec<u8>, StoreError> {
        let mut w = Writer::new(ROSTER_ITEM_V1);
        w.str(&self.jid)?;
        match &self.name {
            Some(name) => {
                w.u8(1);
                w.str(name)?;
            }
            None => w.u8(0),
        }
        w.str(&self.subscription)?;
        w.u8(u8::from(self.ask));
        w.u32(u32::try_from(self.groups.len()).map_err(|_| too_long("groups"))?);
        for g in &self.groups {
            w.str(g)?;
        }
        Ok(w.finish())
    }

    pub(crate) fn decode(data: &[u8]) -> Result<Self, StoreError> {
        let mut r = Reader::new(data, "roster item")?;
        match r.format {
            ROSTER_ITEM_V1 => {}
            other => return Err(r.corrupt_format(other)),
        }
        let jid = r.string()?;
        let name = match r.u8()? {
            0 => None,
            1 => Some(r.string()?),
            _ => return Err(r.corrupt("bad name flag")),
        };
        let subscription = r.string()?;
        let ask = match r.u8()? {
            0 => false,
            1 => true,
            _ => return Err(r.corrupt("bad ask flag")),
        };
        let n = r.u32()?;
        // Each group takes at least its 4-byte length, which bounds the allocation by the input.
        let mut groups = Vec::with_capacity((n as usize).min(r.remaining() / 4));
        for _ in 0..n {
            groups.push(r.string()?);
        }
        r.end()?;
        Ok(RosterItem {
            jid,
            name,
            subscription,
            ask,
            groups,
        })
    }
}

impl LastPresence {
    pub(crate) fn encode(&self) -> Result<Vec<u8>, StoreError> {
        let mut w = Writer::new(LAST_PRESENCE_V1);
        w.u64(self.stamp_ms);
        w.bytes(&self.stanza)?;
        Ok(w.finish())
    }

    pub(crate) fn decode(data: &[u8]) -> Result<Self, StoreError> {
        let mut r = Reader::new(data, "last presence")?;
        match r.format {
            LAST_PRESENCE_V1 => {}
            other => return Err(r.corrupt_format(other)),
        }
        let stamp_ms = r.u64()?;
        let stanza = bytes::Bytes::copy_from_slice(r.bytes()?);
        r.end()?;
        Ok(LastPresence { stanza, stamp_ms })
    }
}

fn too_long(what: &str) -> StoreError {
    StoreError::InvalidInput(format!("{what} too long to store"))
}

struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    fn new(format: u8) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.push(format);
        Writer { buf }
    }

    fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    fn bytes(&mut self, v: &[u8]) -> Result<(), StoreError> {
        self.u32(u32::try_from(v.len()).map_err(|_| too_long("field"))?);
        self.buf.extend_from_slice(v);
        Ok(())
    }

    fn str(&mut self, v: &str) -> Result<(), StoreError> {
        self.bytes(v.as_bytes())
    }

    fn finish(self) -> Vec<u8> {
        self.buf
    }
}

struct Reader<'a> {
    what: &'static str,
    format: u8,
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8], what: &'static str) -> Result<Self, StoreError> {
        let (&format, rest) = data
            .split_first()
            .ok_or_else(|| StoreError::Corrupt(format!("{what}: empty record")))?;
        Ok(Reader { what, format, rest })
    }

    fn corrupt(&self, why: &str) -> StoreError {
        StoreError::Corrupt(format!("{}: {why}", self.what))
    }

    fn corrupt_format(&self, format: u8) -> StoreError {
        StoreError::Corrupt(format!("{}: unknown record format {format}", self.what))
    }

    fn remaining(&self) -> usize {
        self.rest.len()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.rest.len() < n {
            return Err(self.corrupt("truncated"));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, StoreError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, StoreError> {
        let b = self.take(8)?;
        let mut be = [0u8; 8];
        be.copy_from_slice(b);
        Ok(u64::from_be_bytes(be))
    }

    fn bytes(&mut self) -> Result<&'a [u8], StoreError> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    fn string(&mut self) -> Result<String, StoreError> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| self.corrupt("string is not UTF-8"))
    }

    fn end(&self) -> Result<(), StoreError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(self.corrupt("trailing bytes"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cred(hash: HashAlgo, fill: u8) -> ScramCredentials {
        ScramCredentials {
            hash,
            salt: vec![fill; 16],
            iterations: 4096,
            stored_key: vec![fill; hash.output_len()],
            server_key: vec![fill.wrapping_add(1); hash.output_len()],
        }
    }

    #[test]
    fn account_round_trip_and_dedup() {
        let record = AccountRecord::new(vec![
            cred(HashAlgo::Sha512, 1),
            cred(HashAlgo::Sha1, 2),
            cred(HashAlgo::Sha512, 3),
        ]);
        assert_eq!(record.credentials.len(), 2);
        assert_eq!(
            record.credentials(HashAlgo::Sha512),
            Some(&cred(HashAlgo::Sha512, 3))
        );
        assert_eq!(record.credentials(HashAlgo::Sha256), None);
        let bytes = record.encode().unwrap();
        assert_eq!(bytes[0], ACCOUNT_V1);
        assert_eq!(AccountRecord::decode(&bytes).unwrap(), record);
    }

    #[test]
    fn account_refuses_malformed_input() {
        let mut bad = cred(HashAlgo::Sha256, 1);
        bad.stored_key.pop();
        assert!(matches!(
            AccountRecord::new(vec![bad]).encode(),
            Err(StoreError::InvalidInput(_))
        ));
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error() {
        let record = AccountRecord::new(vec![cred(HashAlgo::Sha256, 7)]);
        let bytes = record.encode().unwrap();
        for n in 0..bytes.len() {
            assert!(matches!(
                AccountRecord::decode(&bytes[..n]),
                Err(StoreError::Corrupt(_))
            ));
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            AccountRecord::decode(&longer),
            Err(StoreError::Corrupt(_))
        ));
        let mut future = bytes.clone();
        future[0] = 99;
        assert!(matches!(
            AccountRecord::decode(&future),
            Err(StoreError::Corrupt(_))
        ));
        let mut bad_hash = bytes;
        bad_hash[2] = 9;
        assert!(matches!(
            AccountRecord::decode(&bad_hash),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn roster_item_round_trip() {
        for item in [
            RosterItem {
                jid: "romeo@montague.example".into(),
                name: Some("Romeo".into()),
                subscription: "both".into(),
                ask: true,
                groups: vec!["Friends".into(), "Verona".into()],
            },
            RosterItem {
                jid: "nurse@capulet.example".into(),
                name: None,
                subscription: "none".into(),
                ask: false,
                groups: vec![],
            },
        ] {
            let bytes = item.encode().unwrap();
            assert_eq!(RosterItem::decode(&bytes).unwrap(), item);
            for n in 0..bytes.len() {
                assert!(RosterItem::decode(&bytes[..n]).is_err());
            }
        }
        // A huge group count in a short record must not allocate or panic.
        let mut hostile = vec![ROSTER_ITEM_V1];
        hostile.extend_from_slice(&0u32.to_be_bytes());
        hostile.push(0);
        hostile.extend_from_slice(&0u32.to_be_bytes());
        hostile.push(0);
        hostile.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            RosterItem::decode(&hostile),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn last_presence_round_trip_and_damage() {
        let last = LastPresence {
            stanza: bytes::Bytes::from_static(b"<presence type='unavailable'/>"),
            stamp_ms: 1_700_000_000_123,
        };
        let bytes = last.encode().unwrap();
        assert_eq!(LastPresence::decode(&bytes).unwrap(), last);
        for n in 0..bytes.len() {
            assert!(matches!(
                LastPresence::decode(&bytes[..n]),
                Err(StoreError::Corrupt(_))
            ));
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(LastPresence::decode(&longer).is_err());
        let mut future = bytes;
        future[0] = 2;
        assert!(matches!(
            LastPresence::decode(&future),
            Err(StoreError::Corrupt(_))
        ));
    }
}
