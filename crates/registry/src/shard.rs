//! The shard of a key: a stable hash of the bare JID over the configured shard count.
//!
//! The hash is FNV-1a (64 bit) with its standard offset basis, written out here so that it can
//! never change under us with a dependency upgrade: every registry node and every client must
//! agree on it forever, because changing it moves keys between Raft groups.

/// FNV-1a 64-bit offset basis.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64-bit prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a over `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h = FNV_OFFSET;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// The shard of a normalised bare JID (`local@domain`), in `0..shards`. `shards` of 0 is
/// treated as 1.
pub fn shard_of(bare: &str, shards: u32) -> u32 {
    let n = u64::from(shards.max(1));
    // The remainder is below `shards`, so it fits.
    u32::try_from(fnv1a64(bare.as_bytes()) % n).unwrap_or(0)
}

/// The bare part of a normalised full JID: everything before the first `/` (a localpart and
/// a domainpart never contain `/`, RFC 7622 §3.2 and §3.3).
pub fn bare_of(full: &str) -> &str {
    match full.find('/') {
        Some(i) => full.get(..i).unwrap_or(full),
        None => full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_known_vectors() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn shards_are_stable_and_spread() {
        assert_eq!(shard_of("alice@example.org", 1), 0);
        assert_eq!(shard_of("alice@example.org", 0), 0);
        let s = shard_of("alice@example.org", 16);
        assert_eq!(s, shard_of("alice@example.org", 16));
        let mut counts = [0usize; 8];
        for i in 0..8000 {
            let k = shard_of(&format!("user{i}@example.org"), 8) as usize;
            counts[k] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
    }

    #[test]
    fn bare_part() {
        assert_eq!(bare_of("a@x/r/1"), "a@x");
        assert_eq!(bare_of("a@x"), "a@x");
    }
}
