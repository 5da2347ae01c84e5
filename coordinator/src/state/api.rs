//! What the state machine takes and answers, in its own terms. The gRPC service translates
//! these to and from `proto/ferry.proto`'s messages, so the machine compiles, runs and is
//! tested without protobuf or tonic.

use crate::store::StateSourceRecord;
use std::time::Duration;

/// A worker asking to take part: where its data plane listens, and what it runs on.
#[derive(Clone, Debug, Default)]
pub struct JoinRequest {
    pub host: String,
    pub data_addr: String,
    pub metrics_addr: String,
    pub devices: Vec<String>,
    pub pid: u32,
}

/// The answer to a join: the id to use from now on and the job to run.
#[derive(Clone, Debug)]
pub struct Joined {
    pub worker_id: String,
    pub job_id: String,
    pub job_toml: String,
    pub heartbeat_interval: Duration,
    pub generation: u64,
    /// Training sequences in the corpus: every rank plans its steps from this count.
    pub num_sequences: u64,
}

/// A worker's periodic sign of life, with what `ferry status` shows of it.
#[derive(Clone, Debug, Default)]
pub struct Heartbeat {
    pub worker_id: String,
    pub generation: u64,
    pub step: u64,
    pub loss: f64,
    pub tokens_per_s: f64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HeartbeatAnswer {
    pub generation: u64,
    pub stop: bool,
}

/// A worker at rendezvous: the generation it knew, the step whose state it holds, if any,
/// the collective its rank runs, and an opaque offer for the group (an NCCL unique id, sent
/// once the coordinator asks for it: [`RendezvousOutcome::SendBlob`]).
#[derive(Clone, Debug, Default)]
pub struct RendezvousRequest {
    pub worker_id: String,
    pub known_generation: u64,
    pub holds_step: Option<u64>,
    pub collective: CollectiveKind,
    pub blob: Vec<u8>,
    /// Steps its last group (`known_generation`) trained that it does not know committed.
    pub uncommitted: Vec<TrainedStep>,
    /// The id it had in that group, if it joined again since.
    pub trained_as: Option<String>,
}

/// The collective a worker's rank runs; every member of a group runs the same one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CollectiveKind {
    /// The TCP or shared-memory ring of CPU workers.
    #[default]
    Ring,
    /// NCCL on GPUs: rank 0's offer (its unique id) is handed to every member.
    Nccl,
}

impl CollectiveKind {
    pub(crate) fn index(self) -> usize {
        match self {
            CollectiveKind::Ring => 0,
            CollectiveKind::Nccl => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CollectiveKind::Ring => "the ring (CPU)",
            CollectiveKind::Nccl => "NCCL (GPU)",
        }
    }
}

/// A formed group as one member sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Assignment {
    pub generation: u64,
    pub rank: u32,
    pub world_size: u32,
    /// With `peer_ranks` empty, `peers[r]` is rank r's address; large groups list only the
    /// ring neighbours, `peers[i]` being rank `peer_ranks[i]`'s.
    pub peers: Vec<String>,
    pub peer_ranks: Vec<u32>,
    pub blob: Vec<u8>,
    pub start_step: u64,
    pub source: StateSourceRecord,
    pub checkpoint_path: String,
}

/// What `Rendezvous` answers.
#[derive(Clone, Debug, PartialEq)]
pub enum RendezvousOutcome {
    Ready(Assignment),
    Wait(String),
    /// Like `Wait`, to the member that is rank 0 of the forming group when its collective
    /// needs rank 0's offer: it is to call again at once with its blob.
    SendBlob(String),
    Released,
    Stopped,
    Finished,
}

/// One step a group trained, as its ranks know it after the step's all-reduce.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrainedStep {
    pub step: u64,
    pub loss: f64,
    pub tokens: u64,
    pub step_time_s: f64,
    pub allreduce_s: f64,
    /// The wrapping sum of every rank's sequences digest of the step.
    pub group_digest: u64,
}

/// Rank 0's commit of the steps its group trained since its last commit.
#[derive(Clone, Debug, Default)]
pub struct StepsCommit {
    pub worker_id: String,
    pub generation: u64,
    pub steps: Vec<TrainedStep>,
}

/// What the group does after its next step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Directive {
    Continue,
    /// Membership changes: back to rendezvous.
    Regroup,
    /// The job was stopped: back to rendezvous, which answers STOPPED.
    Stop,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitAnswer {
    pub committed: u64,
    pub directive: Directive,
}

#[derive(Clone, Debug, Default)]
pub struct CheckpointReport {
    pub worker_id: String,
    pub generation: u64,
    pub step: u64,
    pub path: String,
    /// Non-zero: the recorded checkpoint, of this step, does not verify on rank 0, and
    /// `step`/`path` name the newest older one that does (step 0: none).
    pub unverified_step: u64,
    pub unverified_reason: String,
}

/// A member's collective failed; `suspect_rank` names the peer whose link failed, if known.
#[derive(Clone, Debug, Default)]
pub struct FailureReport {
    pub worker_id: String,
    pub generation: u64,
    pub message: String,
    pub suspect_rank: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scaled {
    pub target_workers: u32,
    pub live_workers: u32,
}

/// What a reader of the ledger needs besides its entries: how to rebuild the sample order,
/// and how many committed steps were thrown away and trained again.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LedgerMeta {
    pub num_sequences: u64,
    pub global_batch: u64,
    pub seed: u64,
    pub rollbacks: u64,
    pub redone_steps: u64,
}

/// The job as `ferry status` and the status page show it.
#[derive(Clone, Debug, PartialEq)]
pub struct JobStatus {
    pub job_id: String,
    pub job_name: String,
    /// waiting, forming, running, finished or stopped.
    pub phase: &'static str,
    pub generation: u64,
    pub world_size: u32,
    pub committed_steps: u64,
    pub total_steps: u64,
    pub target_workers: u32,
    pub min_workers: u32,
    pub max_workers: u32,
    /// Members first in rank order, then the others.
    pub workers: Vec<WorkerStatus>,
    /// (step, loss) of the most recent committed steps.
    pub recent_loss: Vec<(u64, f64)>,
    /// (step, path) of the checkpoint a restore would load.
    pub latest_checkpoint: Option<(u64, String)>,
    pub tokens_per_s: f64,
    pub rollbacks: u64,
    pub redone_steps: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct WorkerStatus {
    pub worker_id: String,
    pub host: String,
    pub data_addr: String,
    pub metrics_addr: String,
    /// In the current generation, if a member.
    pub rank: Option<u32>,
    pub generation: u64,
    pub step: u64,
    pub loss: f64,
    pub tokens_per_s: f64,
    /// member, standby, leaving or released.
    pub state: &'static str,
    pub last_seen: Duration,
}

/// What happened, for watchers (the launcher, NCCL's regroup watchdog).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A new generation is forming, formed, or the job waits for a quorum.
    Membership,
    /// The target worker count changed.
    Scale,
    Stop,
    /// `worker_id` should exit (scaled down, or left).
    Released,
    Committed,
    Finished,
    /// Heartbeat timeout, reported failure, or set aside for a broken link.
    WorkerLost,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub kind: EventKind,
    pub generation: u64,
    pub world_size: u32,
    pub target_workers: u32,
    pub step: u64,
    pub worker_id: String,
    pub message: String,
}
