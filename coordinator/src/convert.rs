//! Between `proto/ferry.proto`'s messages and the state machine's own types
//! ([`crate::state`]): the only place that knows both.

use crate::state::{
    Assignment, CheckpointReport, CollectiveKind, CommitAnswer, Directive, Event, EventKind,
    FailureReport, Heartbeat, HeartbeatAnswer, JobStatus, JoinRequest, Joined, RendezvousRequest,
    Scaled, StepsCommit, TrainedStep,
};
use crate::store::StateSourceRecord;
use ferry_rpc::proto::{self, commit_steps_reply, rendezvous_reply, watch_event};

impl From<proto::JoinRequest> for JoinRequest {
    fn from(r: proto::JoinRequest) -> Self {
        JoinRequest {
            host: r.host,
            data_addr: r.data_addr,
            metrics_addr: r.metrics_addr,
            devices: r.devices,
            pid: r.pid,
        }
    }
}

impl From<Joined> for proto::JoinReply {
    fn from(j: Joined) -> Self {
        proto::JoinReply {
            worker_id: j.worker_id,
            job_id: j.job_id,
            job_toml: j.job_toml,
            heartbeat_interval_s: j.heartbeat_interval.as_secs_f64(),
            num_sequences: j.num_sequences,
            generation: j.generation,
        }
    }
}

impl From<&proto::HeartbeatRequest> for Heartbeat {
    fn from(r: &proto::HeartbeatRequest) -> Self {
        Heartbeat {
            worker_id: r.worker_id.clone(),
            generation: r.generation,
            step: r.step,
            loss: r.loss,
            tokens_per_s: r.tokens_per_s,
        }
    }
}

impl From<HeartbeatAnswer> for proto::HeartbeatReply {
    fn from(a: HeartbeatAnswer) -> Self {
        proto::HeartbeatReply {
            generation: a.generation,
            stop: a.stop,
        }
    }
}

impl From<Event> for proto::WatchEvent {
    fn from(e: Event) -> Self {
        let kind = match e.kind {
            EventKind::Membership => watch_event::Kind::Membership,
            EventKind::Scale => watch_event::Kind::Scale,
            EventKind::Stop => watch_event::Kind::Stop,
            EventKind::Released => watch_event::Kind::Released,
            EventKind::Committed => watch_event::Kind::Committed,
            EventKind::Finished => watch_event::Kind::Finished,
            EventKind::WorkerLost => watch_event::Kind::WorkerLost,
        };
        proto::WatchEvent {
            kind: kind as i32,
            generation: e.generation,
            world_size: e.world_size,
            target_workers: e.target_workers,
            step: e.step,
            worker_id: e.worker_id,
            message: e.message,
        }
    }
}

impl From<&proto::RendezvousRequest> for RendezvousRequest {
    fn from(r: &proto::RendezvousRequest) -> Self {
        RendezvousRequest {
            worker_id: r.worker_id.clone(),
            known_generation: r.known_generation,
            holds_step: r.has_state.then_some(r.state_step),
            collective: match r.collective() {
                proto::Collective::Unspecified | proto::Collective::Ring => CollectiveKind::Ring,
                proto::Collective::Nccl => CollectiveKind::Nccl,
            },
            blob: r.blob.clone(),
            uncommitted: r.uncommitted.iter().map(TrainedStep::from).collect(),
            trained_as: Some(r.trained_as.clone()).filter(|id| !id.is_empty()),
        }
    }
}

impl From<Assignment> for proto::RendezvousReply {
    fn from(a: Assignment) -> Self {
        proto::RendezvousReply {
            status: rendezvous_reply::Status::Ready as i32,
            generation: a.generation,
            rank: a.rank,
            world_size: a.world_size,
            peers: a.peers,
            peer_ranks: a.peer_ranks,
            blob: a.blob,
            start_step: a.start_step,
            state_source: match a.source {
                StateSourceRecord::Held => proto::StateSource::Held,
                StateSourceRecord::Checkpoint => proto::StateSource::Checkpoint,
                StateSourceRecord::Init => proto::StateSource::Init,
            } as i32,
            checkpoint_path: a.checkpoint_path,
            message: String::new(),
            send_blob: false,
        }
    }
}

impl From<&proto::TrainedStep> for TrainedStep {
    fn from(s: &proto::TrainedStep) -> Self {
        TrainedStep {
            step: s.step,
            loss: s.loss,
            tokens: s.tokens,
            step_time_s: s.step_time_s,
            allreduce_s: s.allreduce_s,
            group_digest: s.group_digest,
        }
    }
}

impl From<&proto::CommitStepsRequest> for StepsCommit {
    fn from(r: &proto::CommitStepsRequest) -> Self {
        StepsCommit {
            worker_id: r.worker_id.clone(),
            generation: r.generation,
            steps: r.steps.iter().map(TrainedStep::from).collect(),
        }
    }
}

impl From<CommitAnswer> for proto::CommitStepsReply {
    fn from(a: CommitAnswer) -> Self {
        let directive = match a.directive {
            Directive::Continue => commit_steps_reply::Directive::Continue,
            Directive::Regroup => commit_steps_reply::Directive::Regroup,
            Directive::Stop => commit_steps_reply::Directive::Stop,
        };
        proto::CommitStepsReply {
            committed_steps: a.committed,
            directive: directive as i32,
        }
    }
}

impl From<&proto::CheckpointReport> for CheckpointReport {
    fn from(r: &proto::CheckpointReport) -> Self {
        CheckpointReport {
            worker_id: r.worker_id.clone(),
            generation: r.generation,
            step: r.step,
            path: r.path.clone(),
            unverified_step: r.unverified_step,
            unverified_reason: r.unverified_reason.clone(),
        }
    }
}

impl From<&proto::FailureReport> for FailureReport {
    fn from(r: &proto::FailureReport) -> Self {
        FailureReport {
            worker_id: r.worker_id.clone(),
            generation: r.generation,
            message: r.message.clone(),
            suspect_rank: r.suspect_rank,
        }
    }
}

impl From<Scaled> for proto::ScaleReply {
    fn from(s: Scaled) -> Self {
        proto::ScaleReply {
            target_workers: s.target_workers,
            live_workers: s.live_workers,
        }
    }
}

impl From<JobStatus> for proto::StatusReply {
    fn from(s: JobStatus) -> Self {
        let (latest_checkpoint_step, latest_checkpoint_path) =
            s.latest_checkpoint.unwrap_or_default();
        proto::StatusReply {
            job_id: s.job_id,
            job_name: s.job_name,
            phase: s.phase.into(),
            generation: s.generation,
            world_size: s.world_size,
            committed_steps: s.committed_steps,
            total_steps: s.total_steps,
            target_workers: s.target_workers,
            min_workers: s.min_workers,
            max_workers: s.max_workers,
            workers: s
                .workers
                .into_iter()
                .map(|w| proto::WorkerStatus {
                    worker_id: w.worker_id,
                    host: w.host,
                    data_addr: w.data_addr,
                    metrics_addr: w.metrics_addr,
                    rank: w.rank.map_or(-1, |r| r as i32),
                    generation: w.generation,
                    step: w.step,
                    loss: w.loss,
                    tokens_per_s: w.tokens_per_s,
                    state: w.state.into(),
                    last_seen_s: w.last_seen.as_secs_f64(),
                })
                .collect(),
            recent_loss: s
                .recent_loss
                .into_iter()
                .map(|(step, loss)| proto::LossPoint { step, loss })
                .collect(),
            latest_checkpoint_step,
            latest_checkpoint_path,
            tokens_per_s: s.tokens_per_s,
            rollbacks: s.rollbacks,
            redone_steps: s.redone_steps,
        }
    }
}
