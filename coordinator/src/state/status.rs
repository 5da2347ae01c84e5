//! What `ferry status` and the status page show: the job, its workers and the loss curve.

use super::api::{JobStatus, WorkerStatus};
use super::{JobState, Phase};
use std::time::Instant;

impl JobState {
    pub fn status(&self, now: Instant) -> JobStatus {
        let phase = if self.job.stopped {
            "stopped"
        } else if self.finished() {
            "finished"
        } else {
            match self.phase {
                Phase::Idle => "waiting",
                Phase::Forming(_) => "forming",
                Phase::Formed => "running",
            }
        };
        let mut workers: Vec<WorkerStatus> = self
            .workers
            .values()
            .map(|w| {
                let rank = self.rank_of(&w.rec.id);
                let state = if w.released {
                    "released"
                } else if w.leaving {
                    "leaving"
                } else if rank.is_some() {
                    "member"
                } else {
                    "standby"
                };
                WorkerStatus {
                    worker_id: w.rec.id.clone(),
                    host: w.rec.host.clone(),
                    data_addr: w.rec.data_addr.clone(),
                    metrics_addr: w.rec.metrics_addr.clone(),
                    rank: rank.map(|r| r as u32),
                    generation: w.generation,
                    step: w.step,
                    loss: w.loss,
                    tokens_per_s: w.tokens_per_s,
                    state,
                    last_seen: now.duration_since(w.last_seen),
                }
            })
            .collect();
        workers.sort_by_key(|w| (w.rank.is_none(), w.rank, w.worker_id.clone()));
        let recent_loss = self
            .loss_history
            .iter()
            .rev()
            .take(2000)
            .rev()
            .copied()
            .collect();
        let tail = self.ledger_tail.as_ref();
        let tokens_per_s = tail
            .filter(|e| e.step_time_s > 0.0)
            .map_or(0.0, |e| e.tokens as f64 / e.step_time_s);
        JobStatus {
            job_id: self.job.job_id.clone(),
            job_name: self.spec.job.name.clone(),
            phase,
            generation: self.job.generation,
            world_size: self.job.formed.as_ref().map_or(0, |f| f.ranks.len() as u32),
            committed_steps: self.job.committed,
            total_steps: self.spec.job.steps,
            target_workers: self.job.target_workers,
            min_workers: self.spec.cluster.min_workers,
            max_workers: self.spec.max_workers(),
            workers,
            recent_loss,
            latest_checkpoint: self
                .job
                .checkpoint
                .as_ref()
                .map(|c| (c.step, c.path.clone())),
            tokens_per_s,
            rollbacks: self.job.rollbacks,
            redone_steps: self.job.redone_steps,
        }
    }
}
