//! Entering a generation: rendezvous, connecting the collective, taking the group's state.

use super::coordinator_link::{rpc, Failure};
use super::flat::broadcast_state;
use super::group::group_peers;
use super::telemetry;
use super::worker::Worker;
use anyhow::{bail, Result};
use ferry_collective::{nccl, Collective, GroupSpec, RingAllReduce};
use ferry_engine::checkpoint;
use ferry_engine::error::EngineError;
use ferry_engine::train::Engine;
use ferry_rpc::proto::{self, rendezvous_reply, StateSource};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::Code;

impl Worker {
    pub(super) fn rendezvous(&mut self) -> Result<proto::RendezvousReply> {
        let mut last_message = String::new();
        let collective = match self.nccl_device {
            Some(_) => proto::Collective::Nccl,
            None => proto::Collective::Ring,
        };
        loop {
            // An NCCL unique id is made only when the coordinator asks this worker, as rank
            // 0 of the forming group, for one (`send_blob`); it hands it to every member.
            // Each id starts a bootstrap thread in NCCL that lives until a communicator uses
            // it, so one made but not used yet is offered again rather than made anew.
            let req = proto::RendezvousRequest {
                worker_id: self.id(),
                known_generation: self.generation,
                has_state: self.state_step.is_some(),
                state_step: self.state_step.unwrap_or(0),
                blob: self.nccl_id.clone().unwrap_or_default(),
                collective: collective as i32,
                uncommitted: self.uncommitted.offer(),
                trained_as: match &self.member_id {
                    Some(old) if *old != self.id() => old.clone(),
                    _ => String::new(),
                },
            };
            let reply = match self.call_status(|mut c| {
                let req = req.clone();
                async move { c.rendezvous(req).await }
            }) {
                Ok(reply) => reply,
                Err(s) if s.code() == Code::NotFound => {
                    self.rejoin(s.message())?;
                    continue;
                }
                Err(s) => return Err(rpc(&self.coordinator, "rendezvous", s)),
            };
            telemetry::beat();
            if reply.status() == rendezvous_reply::Status::Ready && reply.rank == 0 {
                // The group's communicator uses this rank's id: it cannot serve another.
                self.nccl_id = None;
            }
            if reply.status() != rendezvous_reply::Status::Wait {
                return Ok(reply);
            }
            if reply.send_blob {
                if self.nccl_device.is_none() {
                    bail!(
                        "the coordinator asked this worker, which runs the ring, for an NCCL \
                         unique id"
                    );
                }
                if self.nccl_id.is_none() {
                    let id =
                        nccl::unique_id().map_err(|e| anyhow::anyhow!("NCCL unique id: {e}"))?;
                    self.nccl_id = Some(id);
                }
                continue;
            }
            if reply.message != last_message {
                eprintln!("rendezvous: {}", reply.message);
                last_message = reply.message;
            }
        }
    }

    pub(super) fn connect(
        &self,
        reply: &proto::RendezvousReply,
    ) -> Result<Box<dyn Collective>, Failure> {
        let peers = group_peers(reply, self.spec.max_workers()).map_err(|why| Failure {
            why: format!("the coordinator's rendezvous reply is malformed: {why}"),
            suspect: None,
        })?;
        let spec = GroupSpec {
            rank: reply.rank as usize,
            world_size: reply.world_size as usize,
            peers,
            generation: reply.generation,
            job_token: self.token.clone(),
            timeout: Duration::from_secs_f64(self.spec.cluster.collective_timeout_s),
            message_mac: true,
        };
        match self.nccl_device {
            None => RingAllReduce::connect(&self.listener, &spec)
                .map(|r| Box::new(r) as Box<dyn Collective>)
                .map_err(|e| Failure::of("cannot connect the ring", &e)),
            Some(device) => {
                let comm = nccl::NcclCollective::new(&spec, &reply.blob, device)
                    .map_err(|e| Failure::of("cannot create the NCCL communicator", &e))?;
                self.watch_for_regroup(reply.generation, comm.abort_handle());
                Ok(Box::new(comm))
            }
        }
    }

    /// NCCL's watchdog: a membership change announced while a collective is blocked aborts the
    /// communicator, so the rank goes back to rendezvous instead of waiting out the timeout.
    fn watch_for_regroup(&self, generation: u64, abort: nccl::NcclAbortHandle) {
        let mut c = self.clients.coordinator.clone();
        let id = self.id();
        let task = self.rt.spawn(async move {
            let Ok(stream) = c.watch(proto::WatchRequest { worker_id: id }).await else {
                return;
            };
            let mut stream = stream.into_inner();
            // Only a group that lost a member is broken: a regroup for a join or a leave is
            // announced to rank 0 at its commit and the ranks finish their step first.
            let mut lost = false;
            while let Ok(Some(event)) = stream.message().await {
                lost |= event.kind() == proto::watch_event::Kind::WorkerLost;
                let membership = event.kind() == proto::watch_event::Kind::Membership;
                if lost && membership && event.generation > generation {
                    // Off this runtime's one worker thread: `ncclCommAbort` blocks (up to
                    // seconds), and heartbeats run on it.
                    abort.abort_in_background();
                    return;
                }
            }
        });
        // One watchdog per generation: the previous one's communicator is gone.
        if let Some(old) = self.watchdog.lock().ok().and_then(|mut w| w.replace(task)) {
            old.abort();
        }
    }

    /// Rank 0 makes its state the group's starting point; everyone else receives it.
    pub(super) fn take_group_state(
        &mut self,
        reply: &proto::RendezvousReply,
        coll: &mut dyn Collective,
    ) -> Result<Option<Failure>> {
        let start = reply.start_step;
        if reply.rank == 0 {
            match reply.state_source() {
                StateSource::Held => {
                    if self.state_step != Some(start) {
                        bail!("coordinator made this worker rank 0 holding step {start}, but it holds {:?}", self.state_step);
                    }
                }
                StateSource::Checkpoint => {
                    let dir = PathBuf::from(&reply.checkpoint_path);
                    let verified = match checkpoint::verify_checkpoint(&dir, start) {
                        Ok(st) => st,
                        Err(why) => return self.fall_back_from(reply, &dir, why).map(Some),
                    };
                    eprintln!("restoring {} for step {start}", dir.display());
                    let st = self.engine.load_checkpoint(&dir, verified)?;
                    if st.step != start {
                        bail!(
                            "{}: holds step {}, the coordinator resumes at {start}",
                            dir.display(),
                            st.step
                        );
                    }
                }
                StateSource::Init | StateSource::Unspecified => {
                    if self.state_step.is_some() {
                        let log = self.engine.trained_log.take();
                        self.engine = Engine::new(&self.cfg)?;
                        self.engine.trained_log = log;
                    }
                }
            }
        }
        if let Err(e) = broadcast_state(&self.engine.ps, &self.engine.opt, 0, coll) {
            return Ok(Some(Failure::of("state broadcast failed", &e)));
        }
        self.engine.opt.set_steps(start as i64);
        self.state_step = Some(start);
        Ok(None)
    }

    /// The checkpoint the coordinator recorded does not verify here: this rank 0 names it
    /// and why, sets it aside, tells the coordinator the newest older checkpoint that
    /// verifies (none: the start), and goes back to rendezvous. The coordinator falls back to
    /// that one and rolls the ledger back to its step; the group that forms next restores it.
    fn fall_back_from(
        &mut self,
        reply: &proto::RendezvousReply,
        dir: &Path,
        why: EngineError,
    ) -> Result<Failure> {
        let start = reply.start_step;
        eprintln!(
            "generation {}: the coordinator's checkpoint {} (step {start}) does not verify: {why}",
            reply.generation,
            dir.display()
        );
        set_aside(dir);
        let (found, skipped) = checkpoint::newest_verified(&self.spec.job.run_dir, Some(start))?;
        for u in &skipped {
            eprintln!(
                "passing over {} (step {}) too: it does not verify: {}",
                u.dir.display(),
                u.step,
                u.why
            );
            set_aside(&u.dir);
        }
        let (step, path) = match &found {
            Some((step, path)) => {
                eprintln!(
                    "falling back to step {step} ({}), the newest checkpoint that verifies: the \
                     job goes back to it",
                    path.display()
                );
                (*step, path.display().to_string())
            }
            None => {
                eprintln!("falling back to step 0: no older checkpoint verifies");
                (0, String::new())
            }
        };
        let req = proto::CheckpointReport {
            worker_id: self.id(),
            generation: reply.generation,
            step,
            path,
            unverified_step: start,
            unverified_reason: why.to_string(),
        };
        match self.call_status(|mut c| {
            let req = req.clone();
            async move { c.report_checkpoint(req).await }
        }) {
            Ok(_) => {}
            // The group changed meanwhile: whoever restores next finds the same.
            Err(s)
                if matches!(
                    s.code(),
                    Code::PermissionDenied | Code::FailedPrecondition | Code::NotFound
                ) =>
            {
                eprintln!("the coordinator did not take the fallback: {}", s.message());
            }
            Err(s) => return Err(rpc(&self.coordinator, "report_checkpoint", s)),
        }
        Ok(Failure {
            why: format!(
                "the checkpoint of step {start} does not verify; the job falls back to step {step}"
            ),
            suspect: None,
        })
    }
}

/// Moves a checkpoint that does not verify out of the way (see [`checkpoint::set_aside`]);
/// best effort: one left in place is found again, and passed over again.
fn set_aside(dir: &Path) {
    if !dir.exists() {
        return;
    }
    match checkpoint::set_aside(dir) {
        Ok(to) => eprintln!("set {} aside as {}", dir.display(), to.display()),
        Err(e) => eprintln!("cannot set {} aside: {e}", dir.display()),
    }
}
