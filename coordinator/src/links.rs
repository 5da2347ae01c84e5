//! Which workers cannot reach each other, and who steps aside when two cannot.
//!
//! A cut between two workers that both still reach the coordinator is invisible to heartbeats:
//! both stay alive, every group that holds them fails its collective, and the coordinator would
//! form the same group again forever. Ranks therefore report the peer their collective lost
//! (`FailureReport.suspect_rank`: a peer that made no progress within the timeout, or whose
//! handshake never completed), and this module keeps the score:
//!
//! * A pair of workers that failed together in [`STRIKES`] generations since they last
//!   committed a step together is a broken link. One of the two is *set aside*: left out of
//!   groups for a cool-off, then offered again.
//! * **Who steps aside:** the one blamed in more failures (a host whose network is bad fails
//!   with every peer, so it is the one to drop); on a tie, the later joiner. The earlier joiner
//!   has usually trained longest and ranks lowest, so rank 0, which holds the state, stays. The
//!   rule reads only what the coordinator has recorded, so no two answers can alternate.
//! * **The cool-off doubles** for each time a worker is set aside (30 s, 1 min, 2 min, ... up
//!   to 10 min), and a pair's strikes are kept until the two commit a step together. A link
//!   that stays broken costs one failed attempt per cool-off, ever more rarely; a link that
//!   heals brings the worker back at the end of its cool-off. The job converges to a group that
//!   can train and never flaps at the rate of the collective timeout.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// Generations a pair must fail together before one of it is set aside.
pub const STRIKES: u32 = 2;
const FIRST_COOL_OFF: Duration = Duration::from_secs(30);
const MAX_COOL_OFF: Duration = Duration::from_secs(600);

#[derive(Default)]
struct Pair {
    generations: u32,
    last_generation: Option<u64>,
}

struct SetAside {
    until: Instant,
    /// The worker it could not reach, for messages.
    partner: String,
}

/// A decision of [`LinkHealth::report`]: `worker` is set aside for `cool_off`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub worker: String,
    pub partner: String,
    pub cool_off: Duration,
}

#[derive(Default)]
pub struct LinkHealth {
    pairs: BTreeMap<(String, String), Pair>,
    set_aside: HashMap<String, SetAside>,
    /// How often each worker was set aside: its next cool-off doubles with each.
    times: HashMap<String, u32>,
}

fn key(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    }
}

impl LinkHealth {
    /// `reporter`'s collective of `generation` lost `suspect`. Returns who is set aside, if the
    /// pair has now failed in [`STRIKES`] generations. `join_seq` orders workers by joining.
    pub fn report(
        &mut self,
        reporter: &str,
        suspect: &str,
        generation: u64,
        now: Instant,
        join_seq: impl Fn(&str) -> u64,
    ) -> Option<Decision> {
        if reporter == suspect {
            return None;
        }
        let pair = self.pairs.entry(key(reporter, suspect)).or_default();
        if pair.last_generation == Some(generation) {
            return None;
        }
        pair.last_generation = Some(generation);
        pair.generations += 1;
        if pair.generations < STRIKES
            || self.set_aside_for(reporter, now).is_some()
            || self.set_aside_for(suspect, now).is_some()
        {
            return None;
        }
        let blame = |id: &str| -> u32 {
            self.pairs
                .iter()
                .filter(|((a, b), _)| a == id || b == id)
                .map(|(_, p)| p.generations)
                .sum()
        };
        let (a, b) = (reporter, suspect);
        let out = match blame(a).cmp(&blame(b)) {
            std::cmp::Ordering::Greater => a,
            std::cmp::Ordering::Less => b,
            std::cmp::Ordering::Equal if join_seq(a) > join_seq(b) => a,
            std::cmp::Ordering::Equal => b,
        };
        let partner = if out == a { b } else { a };
        let times = self.times.entry(out.to_string()).or_default();
        let cool_off = FIRST_COOL_OFF
            .saturating_mul(1 << (*times).min(10))
            .min(MAX_COOL_OFF);
        *times += 1;
        self.set_aside.insert(
            out.to_string(),
            SetAside {
                until: now + cool_off,
                partner: partner.to_string(),
            },
        );
        Some(Decision {
            worker: out.to_string(),
            partner: partner.to_string(),
            cool_off,
        })
    }

    /// How much longer `id` stays out of groups, and the worker it could not reach.
    pub fn set_aside_for(&self, id: &str, now: Instant) -> Option<(Duration, &str)> {
        let s = self.set_aside.get(id)?;
        (s.until > now).then(|| (s.until - now, s.partner.as_str()))
    }

    /// Workers whose cool-off has ended: they may be proposed again.
    pub fn readmit_due(&mut self, now: Instant) -> Vec<String> {
        let due: Vec<String> = self
            .set_aside
            .iter()
            .filter(|(_, s)| s.until <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &due {
            self.set_aside.remove(id);
        }
        due
    }

    /// A group committed a step: every pair in it can reach each other again.
    pub fn trained_together(&mut self, ranks: &[String]) {
        if self.pairs.is_empty() {
            return;
        }
        self.pairs
            .retain(|(a, b), _| !(ranks.contains(a) && ranks.contains(b)));
    }

    /// `id` left the job.
    pub fn forget(&mut self, id: &str) {
        self.pairs.retain(|(a, b), _| a != id && b != id);
        self.set_aside.remove(id);
        self.times.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(id: &str) -> u64 {
        id.trim_start_matches('w').parse().unwrap()
    }

    #[test]
    fn a_pair_failing_in_two_generations_sets_the_later_joiner_aside() {
        let mut h = LinkHealth::default();
        let t = Instant::now();
        // Both ends report each generation; one generation counts once.
        assert_eq!(h.report("w1", "w2", 5, t, seq), None);
        assert_eq!(h.report("w2", "w1", 5, t, seq), None);
        let d = h.report("w2", "w1", 6, t, seq).unwrap();
        assert_eq!(d.worker, "w2");
        assert_eq!(d.partner, "w1");
        assert_eq!(d.cool_off, FIRST_COOL_OFF);
        assert_eq!(h.report("w1", "w2", 6, t, seq), None, "decided once");
        assert_eq!(h.set_aside_for("w2", t).map(|(_, p)| p), Some("w1"));
        assert!(h.set_aside_for("w1", t).is_none());
    }

    #[test]
    fn the_worker_blamed_with_more_peers_leaves_whatever_its_join_order() {
        let mut h = LinkHealth::default();
        let t = Instant::now();
        // w1 joined first but fails with w2 and w3: it is the bad one.
        assert_eq!(h.report("w2", "w1", 1, t, seq), None);
        assert_eq!(h.report("w3", "w1", 2, t, seq), None);
        let d = h.report("w2", "w1", 3, t, seq).unwrap();
        assert_eq!(d.worker, "w1");
    }

    #[test]
    fn the_cool_off_doubles_and_a_shared_commit_clears_the_strikes() {
        let mut h = LinkHealth::default();
        let t0 = Instant::now();
        h.report("w1", "w2", 1, t0, seq);
        assert_eq!(
            h.report("w1", "w2", 2, t0, seq).unwrap().cool_off,
            FIRST_COOL_OFF
        );
        assert!(h.readmit_due(t0).is_empty());
        let t1 = t0 + FIRST_COOL_OFF;
        assert_eq!(h.readmit_due(t1), vec!["w2".to_string()]);
        // Back and still cut: the strikes are kept, so one more failure sets it aside again,
        // for twice as long.
        let d = h.report("w1", "w2", 3, t1, seq).unwrap();
        assert_eq!(d.cool_off, 2 * FIRST_COOL_OFF);
        let t2 = t1 + d.cool_off;
        assert_eq!(h.readmit_due(t2).len(), 1);
        // The link healed: a step committed together forgets the pair.
        h.trained_together(&["w1".into(), "w2".into(), "w3".into()]);
        assert_eq!(h.report("w1", "w2", 4, t2, seq), None);
    }

    #[test]
    fn the_cool_off_is_capped() {
        let mut h = LinkHealth::default();
        let mut t = Instant::now();
        let mut last = Duration::ZERO;
        for g in 0..40 {
            if let Some(d) = h.report("w1", "w2", g, t, seq) {
                last = d.cool_off;
                t += d.cool_off;
                h.readmit_due(t);
            }
        }
        assert_eq!(last, MAX_COOL_OFF);
    }
}
