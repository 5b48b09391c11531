//! The single-node registry of `starling serve`: a map in memory, behind the same trait as
//! the replicated one. It loses everything with the process, which is correct for sessions
//! that die with it. It has no leases; [`SessionRegistry::remove_node`] is its only bulk
//! removal, reported to [`SessionRegistry::node_removals`] subscribers.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::RwLock;
use starling_xmpp::{BareJid, FullJid};

use tokio::sync::broadcast;

use crate::{
    BindOutcome, NODE_REMOVALS_BUFFER, NodeRemoved, RegistryError, SessionRecord, SessionRegistry,
};

/// In-memory registry for one process.
#[derive(Debug)]
pub struct LocalRegistry {
    /// Sessions by bare JID; each account has few resources, so a small vector is the
    /// cheapest map from resource to record.
    accounts: RwLock<HashMap<BareJid, Vec<SessionRecord>>>,
    max_per_account: usize,
    removals: broadcast::Sender<Arc<NodeRemoved>>,
}

impl LocalRegistry {
    /// A registry allowing at most `max_per_account` resources per account.
    pub fn new(max_per_account: usize) -> Self {
        LocalRegistry {
            accounts: RwLock::new(HashMap::new()),
            max_per_account,
            removals: broadcast::channel(NODE_REMOVALS_BUFFER).0,
        }
    }
}

impl Default for LocalRegistry {
    fn default() -> Self {
        Self::new(64)
    }
}

#[async_trait]
impl SessionRegistry for LocalRegistry {
    async fn bind(&self, record: SessionRecord) -> Result<BindOutcome, RegistryError> {
        let bare = record.jid.to_bare();
        let mut accounts = self.accounts.write();
        // Most accounts bind one resource: no room for four records until a second comes.
        let sessions = accounts
            .entry(bare)
            .or_insert_with(|| Vec::with_capacity(1));
        if let Some(existing) = sessions.iter_mut().find(|s| s.jid == record.jid) {
            let old = std::mem::replace(existing, record);
            return Ok(BindOutcome::Replaced(old));
        }
        if sessions.len() >= self.max_per_account {
            return Err(RegistryError::LimitReached);
        }
        sessions.push(record);
        Ok(BindOutcome::Bound)
    }

    async fn unbind(&self, jid: &FullJid, stream_id: &str) -> Result<bool, RegistryError> {
        let bare = jid.to_bare();
        let mut accounts = self.accounts.write();
        let Some(sessions) = accounts.get_mut(&bare) else {
            return Ok(false);
        };
        let before = sessions.len();
        sessions.retain(|s| !(s.jid == *jid && &*s.stream_id == stream_id));
        let removed = sessions.len() != before;
        if sessions.is_empty() {
            accounts.remove(&bare);
        }
        Ok(removed)
    }

    async fn set_presence(
        &self,
        jid: &FullJid,
        stream_id: &str,
        priority: i8,
        presence: Option<Bytes>,
    ) -> Result<(), RegistryError> {
        let mut accounts = self.accounts.write();
        if let Some(s) = accounts.get_mut(&jid.to_bare()).and_then(|v| {
            v.iter_mut()
                .find(|s| s.jid == *jid && &*s.stream_id == stream_id)
        }) {
            s.priority = priority;
            s.presence = presence;
        }
        Ok(())
    }

    async fn session(&self, jid: &FullJid) -> Result<Option<SessionRecord>, RegistryError> {
        let accounts = self.accounts.read();
        Ok(accounts
            .get(&jid.to_bare())
            .and_then(|v| v.iter().find(|s| s.jid == *jid))
            .cloned())
    }

    async fn sessions(&self, bare: &BareJid) -> Result<Vec<SessionRecord>, RegistryError> {
        Ok(self.accounts.read().get(bare).cloned().unwrap_or_default())
    }

    async fn remove_node(&self, node: &str) -> Result<Vec<SessionRecord>, RegistryError> {
        let mut removed = Vec::new();
        let mut accounts = self.accounts.write();
        accounts.retain(|_, sessions| {
            sessions.retain(|s| {
                if &*s.node == node {
                    removed.push(s.clone());
                    false
                } else {
                    true
                }
            });
            !sessions.is_empty()
        });
        drop(accounts);
        if !removed.is_empty() {
            // No subscriber is not an error.
            let _ = self.removals.send(Arc::new(NodeRemoved {
                node: Arc::from(node),
                sessions: removed.clone(),
            }));
        }
        Ok(removed)
    }

    fn node_removals(&self) -> Option<broadcast::Receiver<Arc<NodeRemoved>>> {
        Some(self.removals.subscribe())
    }

    async fn count(&self) -> Result<usize, RegistryError> {
        Ok(self.accounts.read().values().map(Vec::len).sum())
    }

    async fn set_resumption(
        &self,
        jid: &FullJid,
        stream_id: &str,
        resumption: Option<Arc<str>>,
    ) -> Result<bool, RegistryError> {
        let mut accounts = self.accounts.write();
        match accounts.get_mut(&jid.to_bare()).and_then(|v| {
            v.iter_mut()
                .find(|s| s.jid == *jid && &*s.stream_id == stream_id)
        }) {
            Some(s) => {
                s.resumption = resumption;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(jid: &str, node: &str, stream: &str) -> SessionRecord {
        SessionRecord::new(
            starling_xmpp::jid::parse_full(jid).unwrap(),
            Arc::from(node),
            Arc::from(stream),
        )
    }

    #[tokio::test]
    async fn bind_replace_unbind() {
        let reg = LocalRegistry::new(2);
        assert_eq!(
            reg.bind(rec("a@x/1", "e1", "s1")).await,
            Ok(BindOutcome::Bound)
        );
        assert_eq!(
            reg.bind(rec("a@x/2", "e1", "s2")).await,
            Ok(BindOutcome::Bound)
        );
        assert_eq!(
            reg.bind(rec("a@x/3", "e1", "s3")).await,
            Err(RegistryError::LimitReached)
        );
        // Same resource again: the new session wins and the old one is handed back.
        let outcome = reg.bind(rec("a@x/1", "e2", "s4")).await.unwrap();
        assert_eq!(outcome, BindOutcome::Replaced(rec("a@x/1", "e1", "s1")));
        // The replaced session's late unbind does not remove its successor.
        let jid = starling_xmpp::jid::parse_full("a@x/1").unwrap();
        assert_eq!(reg.unbind(&jid, "s1").await, Ok(false));
        assert_eq!(
            reg.session(&jid).await.unwrap().unwrap().node.as_ref(),
            "e2"
        );
        assert_eq!(reg.unbind(&jid, "s4").await, Ok(true));
        assert_eq!(reg.count().await, Ok(1));
    }

    #[tokio::test]
    async fn presence_and_node_removal() {
        let reg = LocalRegistry::default();
        reg.bind(rec("a@x/1", "e1", "s1")).await.unwrap();
        reg.bind(rec("a@x/2", "e2", "s2")).await.unwrap();
        reg.bind(rec("b@x/1", "e1", "s3")).await.unwrap();
        let jid = starling_xmpp::jid::parse_full("a@x/1").unwrap();
        reg.set_presence(&jid, "s1", 5, Some(Bytes::from_static(b"<presence/>")))
            .await
            .unwrap();
        // A stale stream id changes nothing.
        reg.set_presence(&jid, "old", 9, None).await.unwrap();
        let s = reg.session(&jid).await.unwrap().unwrap();
        assert_eq!((s.priority, s.is_available()), (5, true));
        let bare = starling_xmpp::jid::parse_bare("a@x").unwrap();
        assert_eq!(reg.sessions(&bare).await.unwrap().len(), 2);
        let mut removals = reg.node_removals().unwrap();
        let removed = reg.remove_node("e1").await.unwrap();
        assert_eq!(removed.len(), 2);
        let event = removals.try_recv().unwrap();
        assert_eq!((&*event.node, &event.sessions), ("e1", &removed));
        assert!(reg.remove_node("e1").await.unwrap().is_empty());
        assert!(
            removals.try_recv().is_err(),
            "nothing removed, nothing reported"
        );
        assert_eq!(reg.sessions(&bare).await.unwrap().len(), 1);
        assert_eq!(reg.count().await, Ok(1));
    }

    #[tokio::test]
    async fn resumption_ids() {
        let reg = LocalRegistry::default();
        reg.bind(rec("a@x/1", "e1", "s1")).await.unwrap();
        let jid = starling_xmpp::jid::parse_full("a@x/1").unwrap();
        let bare = jid.to_bare();
        assert_eq!(
            reg.set_resumption(&jid, "old", Some(Arc::from("r"))).await,
            Ok(false)
        );
        assert_eq!(
            reg.set_resumption(&jid, "s1", Some(Arc::from("r"))).await,
            Ok(true)
        );
        let s = reg
            .session_by_resumption(&bare, "r")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(s.jid, jid);
        assert_eq!(reg.session_by_resumption(&bare, "q").await, Ok(None));
        // The in-process registry has no leases; a heartbeat is accepted.
        assert_eq!(
            reg.heartbeat("e1", std::time::Duration::from_secs(1)).await,
            Ok(())
        );
    }
}
