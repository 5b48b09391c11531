//! Leader spreading: every shard has a **preferred leader**, derived from its membership alone,
//! and the current leader hands the shard to it when it can.
//!
//! The preferred leader of shard `s` is the voter at position `s % n` of the shard's voter ids
//! in ascending order, so every node computes the same answer from the same membership, the
//! shards spread evenly over the voters (at most one apart), and the answer moves when the
//! membership changes. At bootstrap it is also the shard's designated initialiser, so a new
//! cluster starts balanced (see [`crate::node`]).
//!
//! **Handing over.** openraft 0.9 has no leadership transfer, but a voter can campaign
//! (`trigger().elect()`), and it wins when a majority grants its vote. A voter refuses votes
//! while its leader lease holds (it heard from a leader less than `election_timeout_max` ago)
//! and to a candidate whose log is behind its own. The leader's own lease dates from its
//! election: once it has led for longer than the lease, it grants the vote of an up-to-date
//! candidate and steps down. So the leader, every `rebalance_interval`, for each shard it
//! leads that prefers another voter `P`:
//! 1. checks that it has led for longer than the lease, that `P` is a voter and that it has
//!    acknowledged the leader's whole log (healthy and caught up);
//! 2. holds new proposals of the shard (they wait in the proposer's bounded queue), waits for
//!    `P` to match the last log index, and asks `P` to campaign (`Campaign` RPC);
//! 3. waits for the leadership to move (at most one lease), then releases the proposals: if
//!    it is no longer the leader they are answered `NotLeader` and clients follow the new one.
//!
//! The candidate's vote and the old leader's make a majority only when the shard has at most
//! three voters: with more, the other followers' leases refuse the vote, and the shard keeps
//! its leader ([`Decision::TooManyVoters`], counted in the metrics).
//!
//! Every tick also publishes each shard's leader, term and applied index as gauges, which the
//! multi-process test harness reads to wait for the cluster.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::ServerState;

use crate::codec::MemberId;
use crate::node::{Shard, Shared};
use crate::pb;

/// The preferred leader of `shard` among `voters` (any order): the voter at `shard % n` of the
/// ids in ascending order.
pub(crate) fn preferred(shard: u32, voters: &[MemberId]) -> Option<MemberId> {
    let mut sorted = voters.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.is_empty() {
        return None;
    }
    sorted.get(shard as usize % sorted.len()).copied()
}

/// What the leader of a shard sees when it considers handing it over.
#[derive(Debug, Clone)]
pub(crate) struct LeaderView {
    /// This node.
    pub(crate) me: MemberId,
    /// The shard's voters.
    pub(crate) voters: Vec<MemberId>,
    /// The leader's last log index.
    pub(crate) last_log_index: u64,
    /// The highest index each follower acknowledged.
    pub(crate) matched: BTreeMap<MemberId, u64>,
    /// How long this node has led the shard in its current term.
    pub(crate) led_for: Duration,
}

/// The rebalancer's verdict on one shard it leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// This node is the preferred leader (or there is none).
    Stay,
    /// Led for less than the lease: its own lease would refuse the candidate.
    TooSoon,
    /// The preferred voter has not acknowledged the whole log (down, slow, catching up).
    NotCaughtUp(MemberId),
    /// More than three voters: the candidate cannot win against the followers' leases.
    TooManyVoters(MemberId),
    /// Hand the shard to this voter.
    Transfer(MemberId),
}

/// Decides whether the leader of `shard` should hand it to its preferred voter; `lease` is
/// the leader lease (`election_timeout_max`).
pub(crate) fn decide(shard: u32, view: &LeaderView, lease: Duration) -> Decision {
    let Some(p) = preferred(shard, &view.voters) else {
        return Decision::Stay;
    };
    if p == view.me {
        return Decision::Stay;
    }
    if view.voters.len() > 3 {
        return Decision::TooManyVoters(p);
    }
    if view.led_for <= lease {
        return Decision::TooSoon;
    }
    if view.matched.get(&p).copied().unwrap_or(0) < view.last_log_index {
        return Decision::NotCaughtUp(p);
    }
    Decision::Transfer(p)
}

/// The voter's side of a hand-over: campaigns if it can win, else says why not.
pub(crate) async fn campaign(
    me: MemberId,
    shard: &Shard,
    req: &pb::CampaignRequest,
) -> Option<String> {
    let (state, term, last, voter) = {
        let m = shard.raft.metrics();
        let m = m.borrow();
        let voter = m
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == me);
        (
            m.state,
            m.current_term,
            m.last_log_index.unwrap_or(0),
            voter,
        )
    };
    if state == ServerState::Leader {
        return None;
    }
    if !voter {
        return Some("not a voter of the shard".into());
    }
    if term != req.term {
        return Some(format!("term {term}, asked in term {}", req.term));
    }
    if last < req.last_log_index {
        return Some(format!(
            "log at {last}, behind the leader's {}",
            req.last_log_index
        ));
    }
    match shard.raft.trigger().elect().await {
        Ok(()) => None,
        Err(e) => Some(e.to_string()),
    }
}

/// Publishes the gauges of every shard and, unless `interval` is zero, hands over the shards
/// this node leads but does not prefer (see the module doc). `lease` is the leader lease.
pub(crate) async fn run(shared: Arc<Shared>, interval: Duration, lease: Duration) {
    let n = shared.shards.len();
    let mut leading_since: Vec<Option<(u64, Instant)>> = vec![None; n];
    let period = if interval.is_zero() {
        Duration::from_millis(500)
    } else {
        interval
    };
    let mut tick = tokio::time::interval(period.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let labels: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shared.cancel.cancelled() => return,
        }
        let mut led = 0usize;
        let mut candidate = None;
        for (i, s) in shared.shards.iter().enumerate() {
            let shard = u32::try_from(i).unwrap_or(u32::MAX);
            let label = labels.get(i).cloned().unwrap_or_default();
            let (state, view) = {
                let m = s.raft.metrics();
                let m = m.borrow();
                metrics::gauge!("starling_registry_shard_leader", "shard" => label.clone())
                    .set(m.current_leader.unwrap_or(0) as f64);
                metrics::gauge!("starling_registry_shard_term", "shard" => label.clone())
                    .set(m.current_term as f64);
                metrics::gauge!("starling_registry_shard_applied_index", "shard" => label.clone())
                    .set(m.last_applied.map_or(0, |l| l.index) as f64);
                metrics::gauge!("starling_registry_sessions", "shard" => label)
                    .set(s.machine.read(|st| st.count()).1 as f64);
                let slot = leading_since.get_mut(i);
                let led_for = match (m.state, slot) {
                    (ServerState::Leader, Some(slot)) => {
                        let since = match slot {
                            Some((t, since)) if *t == m.current_term => *since,
                            _ => {
                                let now = Instant::now();
                                *slot = Some((m.current_term, now));
                                now
                            }
                        };
                        since.elapsed()
                    }
                    (_, Some(slot)) => {
                        *slot = None;
                        Duration::ZERO
                    }
                    (_, None) => Duration::ZERO,
                };
                let view = LeaderView {
                    me: shared.id,
                    voters: m.membership_config.membership().voter_ids().collect(),
                    last_log_index: m.last_log_index.unwrap_or(0),
                    matched: m
                        .replication
                        .iter()
                        .flatten()
                        .map(|(id, l)| (*id, l.map_or(0, |l| l.index)))
                        .collect(),
                    led_for,
                };
                (m.state, (view, m.current_term))
            };
            if state != ServerState::Leader {
                continue;
            }
            led += 1;
            if interval.is_zero() || candidate.is_some() {
                continue;
            }
            let (view, term) = view;
            match decide(shard, &view, lease) {
                Decision::Transfer(to) => candidate = Some((shard, to, term)),
                Decision::TooManyVoters(_) => {
                    metrics::counter!("starling_registry_rebalance_total", "outcome" => "too_many_voters")
                        .increment(1);
                }
                Decision::Stay | Decision::TooSoon | Decision::NotCaughtUp(_) => {}
            }
        }
        metrics::gauge!("starling_registry_shards_led").set(led as f64);
        // One hand-over per tick: each holds one shard's writes for a moment.
        if let Some((shard, to, term)) = candidate
            && let Some(s) = shared.shards.get(shard as usize)
        {
            let outcome = transfer(&shared, s, shard, to, term, lease).await;
            tracing::info!(shard, to, outcome, "registry leader hand-over");
            metrics::counter!("starling_registry_rebalance_total", "outcome" => outcome)
                .increment(1);
        }
    }
}

/// Hands `shard` (led by this node in `term`) to `to`; returns the outcome's name.
async fn transfer(
    shared: &Shared,
    s: &Shard,
    shard: u32,
    to: MemberId,
    term: u64,
    lease: Duration,
) -> &'static str {
    let addr = {
        let m = s.raft.metrics();
        let m = m.borrow();
        m.membership_config
            .membership()
            .get_node(&to)
            .map(|n| n.addr.clone())
    };
    let Some(addr) = addr else {
        return "no_address";
    };
    let Ok(channel) = shared.channels.get(&addr) else {
        return "bad_address";
    };
    let _hold = s.proposer.hold();
    let mut metrics = s.raft.metrics();
    // Entries already submitted drain; the candidate must have all of them to win. (The
    // watch's borrow ends inside this block, before the next await.)
    let last = {
        let caught_up = tokio::time::timeout(
            lease,
            metrics.wait_for(|m| {
                m.state != ServerState::Leader
                    || m.current_term != term
                    || m.replication
                        .as_ref()
                        .and_then(|r| r.get(&to))
                        .is_some_and(|l| l.map_or(0, |l| l.index) >= m.last_log_index.unwrap_or(0))
            }),
        )
        .await;
        match caught_up {
            Ok(Ok(m)) if m.state == ServerState::Leader && m.current_term == term => {
                m.last_log_index.unwrap_or(0)
            }
            Ok(_) => return "lost_leadership",
            Err(_) => return "not_caught_up",
        }
    };
    let mut client = pb::raft_transport_client::RaftTransportClient::new(channel);
    let mut req = tonic::Request::new(pb::CampaignRequest {
        shard,
        term,
        last_log_index: last,
        from: shared.id,
    });
    req.set_timeout(lease);
    match client.campaign(req).await {
        Ok(r) if r.get_ref().started => {}
        Ok(r) => {
            tracing::debug!(shard, to, refused = %r.get_ref().refused, "campaign refused");
            return "refused";
        }
        Err(_) => return "unreachable",
    }
    let moved = tokio::time::timeout(
        lease.saturating_mul(2),
        metrics.wait_for(|m| m.current_leader != Some(shared.id)),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    if moved { "moved" } else { "kept" }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(
        me: MemberId,
        voters: &[MemberId],
        last: u64,
        matched: &[(MemberId, u64)],
    ) -> LeaderView {
        LeaderView {
            me,
            voters: voters.to_vec(),
            last_log_index: last,
            matched: matched.iter().copied().collect(),
            led_for: Duration::from_secs(10),
        }
    }

    #[test]
    fn preferred_leaders_spread_evenly_and_follow_membership() {
        let voters = [3, 1, 2];
        let mut per: BTreeMap<MemberId, usize> = BTreeMap::new();
        for s in 0..16 {
            *per.entry(preferred(s, &voters).unwrap()).or_default() += 1;
        }
        assert_eq!(per, BTreeMap::from([(1, 6), (2, 5), (3, 5)]));
        assert_eq!(preferred(0, &voters), Some(1));
        assert_eq!(preferred(4, &[1, 2, 3]), Some(2));
        // Replacing member 2 by 4 moves exactly the shards 2 preferred.
        for s in 0..16 {
            let before = preferred(s, &[1, 2, 3]).unwrap();
            let after = preferred(s, &[1, 3, 4]).unwrap();
            if before != 2 {
                assert_eq!(before == 1, after == 1, "shard {s}");
            }
        }
        assert_eq!(preferred(0, &[]), None);
    }

    #[test]
    fn decisions() {
        let lease = Duration::from_secs(2);
        // Shard 1 prefers voter 2 of [1, 2, 3].
        assert_eq!(
            decide(1, &view(2, &[1, 2, 3], 9, &[]), lease),
            Decision::Stay
        );
        assert_eq!(
            decide(1, &view(1, &[1, 2, 3], 9, &[(2, 9), (3, 4)]), lease),
            Decision::Transfer(2)
        );
        assert_eq!(
            decide(1, &view(1, &[1, 2, 3], 9, &[(2, 8), (3, 9)]), lease),
            Decision::NotCaughtUp(2)
        );
        assert_eq!(
            decide(1, &view(1, &[1, 2, 3], 9, &[(3, 9)]), lease),
            Decision::NotCaughtUp(2)
        );
        let mut young = view(1, &[1, 2, 3], 9, &[(2, 9)]);
        young.led_for = lease;
        assert_eq!(decide(1, &young, lease), Decision::TooSoon);
        assert_eq!(
            decide(1, &view(1, &[1, 2, 3, 4], 9, &[(2, 9)]), lease),
            Decision::TooManyVoters(2)
        );
        assert_eq!(decide(1, &view(1, &[], 9, &[]), lease), Decision::Stay);
    }
}
