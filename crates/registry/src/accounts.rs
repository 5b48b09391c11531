//! The accounts map of a shard (bare JID → its sessions), copy-on-write so that a snapshot
//! can take a point-in-time view in O(1) while the state machine keeps applying entries.
//!
//! Two layers: `base`, an `Arc`'d map, and `overlay`, the accounts changed since `base` was
//! frozen (`Some(sessions)`, or `None` for an account removed since). While nobody holds a
//! frozen view, `base` is unique and every write goes straight into it, so the map costs what
//! a plain map costs. [`AccountMap::freeze`] hands out a clone of the `Arc`; from then on a
//! write copies the account it touches from `base` into `overlay` (on its first change only)
//! and changes the copy, and reads look in `overlay` first. Once the view is dropped, the next
//! write merges `overlay` into `base` (`Arc::get_mut` succeeds again): the cost is that of
//! the accounts changed during the snapshot, never of the whole shard.
//!
//! **Invariant:** what a frozen view holds never changes; what the live map answers is always
//! `overlay` over `base`, whichever mode it is in.
//!
//! Hashing is foldhash with seeds drawn from the OS-seeded RNG (a process-wide shared seed and
//! one per map): about a sixth of SipHash's cost on short keys, and a client cannot choose
//! bare JIDs that collide without knowing the seeds.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, OnceLock};

use foldhash::SharedSeed;
use foldhash::fast::{FoldHasher, SeedableRandomState};

use crate::pb;

/// The accounts' hasher: foldhash keyed with random seeds (see the module doc).
#[derive(Debug, Clone)]
pub(crate) struct KeyedHasher(SeedableRandomState);

impl Default for KeyedHasher {
    fn default() -> Self {
        static SHARED: OnceLock<SharedSeed> = OnceLock::new();
        let shared = SHARED.get_or_init(|| SharedSeed::from_u64(rand::random()));
        KeyedHasher(SeedableRandomState::with_seed(rand::random(), shared))
    }
}

impl BuildHasher for KeyedHasher {
    type Hasher = FoldHasher<'static>;

    fn build_hasher(&self) -> Self::Hasher {
        self.0.build_hasher()
    }
}

/// Sessions by bare JID: one layer of the accounts map, and what a frozen view holds.
pub(crate) type Accounts = HashMap<String, Vec<pb::Session>, KeyedHasher>;

type Overlay = HashMap<String, Option<Vec<pb::Session>>, KeyedHasher>;

/// The copy-on-write accounts map (see the module doc).
#[derive(Debug, Clone, Default)]
pub(crate) struct AccountMap {
    base: Arc<Accounts>,
    /// Accounts changed since `base` was frozen; `None`: removed since.
    overlay: Overlay,
}

/// Where a write goes.
enum Layers<'a> {
    /// Nobody else holds `base`: write into it.
    Unique(&'a mut Accounts),
    /// A frozen view holds `base`: write into `overlay`.
    Frozen {
        base: &'a Accounts,
        overlay: &'a mut Overlay,
    },
}

fn merge(base: &mut Accounts, overlay: &mut Overlay) {
    for (bare, sessions) in overlay.drain() {
        match sessions {
            Some(sessions) => {
                base.insert(bare, sessions);
            }
            None => {
                base.remove(&bare);
            }
        }
    }
}

impl AccountMap {
    /// The layer a write goes to; merges the overlay back first when `base` has become
    /// unique again (the frozen view was dropped).
    fn layers(&mut self) -> Layers<'_> {
        if Arc::get_mut(&mut self.base).is_some() {
            // Unique, so `make_mut` does not clone.
            let base = Arc::make_mut(&mut self.base);
            if !self.overlay.is_empty() {
                merge(base, &mut self.overlay);
                metrics::counter!("starling_registry_overlay_merges_total").increment(1);
            }
            Layers::Unique(base)
        } else {
            Layers::Frozen {
                base: &self.base,
                overlay: &mut self.overlay,
            }
        }
    }

    /// The sessions of an account.
    pub(crate) fn get(&self, bare: &str) -> Option<&Vec<pb::Session>> {
        match self.overlay.get(bare) {
            Some(sessions) => sessions.as_ref(),
            None => self.base.get(bare),
        }
    }

    /// The sessions of an account, to change them.
    pub(crate) fn get_mut(&mut self, bare: &str) -> Option<&mut Vec<pb::Session>> {
        match self.layers() {
            Layers::Unique(base) => base.get_mut(bare),
            Layers::Frozen { base, overlay } => {
                if !overlay.contains_key(bare) {
                    let copy = base.get(bare)?.clone();
                    overlay.insert(bare.to_owned(), Some(copy));
                }
                overlay.get_mut(bare)?.as_mut()
            }
        }
    }

    /// The sessions of an account, created empty if it has none.
    pub(crate) fn entry(&mut self, bare: String) -> &mut Vec<pb::Session> {
        match self.layers() {
            Layers::Unique(base) => base.entry(bare).or_default(),
            Layers::Frozen { base, overlay } => overlay
                .entry(bare)
                .or_insert_with_key(|bare| base.get(bare).cloned())
                .get_or_insert_with(Vec::new),
        }
    }

    /// Removes an account.
    pub(crate) fn remove(&mut self, bare: &str) {
        match self.layers() {
            Layers::Unique(base) => {
                base.remove(bare);
            }
            Layers::Frozen { base, overlay } => {
                if base.contains_key(bare) {
                    overlay.insert(bare.to_owned(), None);
                } else {
                    overlay.remove(bare);
                }
            }
        }
    }

    /// Every account, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&String, &Vec<pb::Session>)> {
        let overlay = &self.overlay;
        overlay
            .iter()
            .filter_map(|(bare, sessions)| Some((bare, sessions.as_ref()?)))
            .chain(
                self.base
                    .iter()
                    .filter(move |(bare, _)| !overlay.contains_key(bare.as_str())),
            )
    }

    /// A view of the map as it is now, which later writes do not change. O(1), except when
    /// an earlier view is still held and writes were made since: then the map is copied once
    /// (openraft builds one snapshot of a shard at a time, so this is rare).
    pub(crate) fn freeze(&mut self) -> Arc<Accounts> {
        if let Layers::Frozen { base, overlay } = self.layers()
            && !overlay.is_empty()
        {
            let mut copy = base.clone();
            merge(&mut copy, overlay);
            self.base = Arc::new(copy);
            metrics::counter!("starling_registry_overlay_copies_total").increment(1);
        }
        Arc::clone(&self.base)
    }

    /// Whether writes currently go to the overlay (a frozen view is held).
    #[cfg(test)]
    pub(crate) fn is_frozen(&self) -> bool {
        Arc::strong_count(&self.base) > 1
    }

    /// How many accounts changed since the base was frozen and are not merged yet.
    #[cfg(test)]
    pub(crate) fn overlay_len(&self) -> usize {
        self.overlay.len()
    }
}

impl PartialEq for AccountMap {
    /// Equal contents, whatever the layering.
    fn eq(&self, other: &Self) -> bool {
        self.iter().count() == other.iter().count()
            && self
                .iter()
                .all(|(bare, sessions)| other.get(bare) == Some(sessions))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sess(jid: &str) -> pb::Session {
        pb::Session {
            jid: jid.into(),
            node: "e1".into(),
            stream_id: "s".into(),
            priority: 0,
            presence: None,
            resumption: None,
        }
    }

    fn contents(m: &AccountMap) -> Vec<(String, Vec<pb::Session>)> {
        let mut v: Vec<_> = m.iter().map(|(k, s)| (k.clone(), s.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    #[test]
    fn a_frozen_view_does_not_see_later_writes_and_the_overlay_merges_back() {
        let mut m = AccountMap::default();
        m.entry("a@x".into()).push(sess("a@x/1"));
        m.entry("b@x".into()).push(sess("b@x/1"));
        let view = m.freeze();
        assert!(m.is_frozen());

        m.entry("a@x".into()).push(sess("a@x/2"));
        m.remove("b@x");
        m.entry("c@x".into()).push(sess("c@x/1"));
        // Created and removed during the view: leaves nothing behind.
        m.entry("d@x".into());
        m.remove("d@x");
        // Removed, then created again.
        m.entry("b@x".into()).push(sess("b@x/9"));
        if let Some(v) = m.get_mut("c@x") {
            v[0].priority = 5;
        }

        assert_eq!(view.len(), 2);
        assert_eq!(view["a@x"], vec![sess("a@x/1")]);
        assert_eq!(view["b@x"], vec![sess("b@x/1")]);
        assert_eq!(m.get("a@x").map(Vec::len), Some(2));
        assert_eq!(m.get("b@x"), Some(&vec![sess("b@x/9")]));
        assert!(m.get("d@x").is_none());
        assert_eq!(m.iter().count(), 3);
        let live = contents(&m);

        drop(view);
        assert!(!m.is_frozen());
        // The next write merges.
        m.remove("nobody@x");
        assert_eq!(m.overlay_len(), 0);
        assert_eq!(contents(&m), live);
    }

    #[test]
    fn freezing_while_an_older_view_is_held_copies_once() {
        let mut m = AccountMap::default();
        m.entry("a@x".into()).push(sess("a@x/1"));
        let first = m.freeze();
        m.entry("b@x".into()).push(sess("b@x/1"));
        let second = m.freeze();
        m.remove("a@x");
        assert_eq!(first.len(), 1);
        assert_eq!(second.len(), 2);
        assert_eq!(contents(&m), vec![("b@x".into(), vec![sess("b@x/1")])]);
        drop((first, second));
        m.entry("c@x".into());
        assert_eq!(m.overlay_len(), 0);
        assert_eq!(m.iter().count(), 2);
    }

    #[test]
    fn maps_with_different_seeds_and_layers_compare_by_contents() {
        let mut a = AccountMap::default();
        let mut b = AccountMap::default();
        a.entry("a@x".into()).push(sess("a@x/1"));
        let _view = b.freeze();
        b.entry("a@x".into()).push(sess("a@x/1"));
        assert_eq!(a, b);
        b.entry("z@x".into());
        assert_ne!(a, b);
    }
}
