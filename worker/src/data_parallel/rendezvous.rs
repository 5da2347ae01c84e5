//! Entering a generation: rendezvous, connecting the collective, taking the group's state.

use super::coordinator_link::{rpc, Failure};
use super::flat::broadcast_state;
use super::group::group_peers;
use super::telemetry;
use super::worker::Worker;
use crate::collective::{nccl, Collective, GroupSpec, RingAllReduce};
use crate::train::Engine;
use anyhow::{bail, Result};
use ferry_common::proto::{self, rendezvous_reply, StateSource};
use std::path::PathBuf;
use std::time::Duration;
use tonic::Code;

impl Worker {
    pub(super) fn rendezvous(&mut self) -> Result<proto::RendezvousReply> {
        let mut last_message = String::new();
        loop {
            // With NCCL every worker offers a unique id; the coordinator hands rank 0's to all.
            let blob = match self.nccl_device {
                Some(_) => nccl::unique_id().map_err(|e| anyhow::anyhow!("NCCL unique id: {e}"))?,
                None => Vec::new(),
            };
            let req = proto::RendezvousRequest {
                worker_id: self.id(),
                known_generation: self.generation,
                has_state: self.state_step.is_some(),
                state_step: self.state_step.unwrap_or(0),
                blob,
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
            if reply.status() != rendezvous_reply::Status::Wait {
                return Ok(reply);
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
            while let Ok(Some(event)) = stream.message().await {
                let membership = event.kind() == proto::watch_event::Kind::Membership
                    || event.kind() == proto::watch_event::Kind::WorkerLost;
                if membership && event.generation > generation {
                    abort.abort();
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
                    eprintln!("restoring {} for step {start}", dir.display());
                    let st = self.engine.restore(&dir)?;
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
}
