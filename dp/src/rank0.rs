//! What rank 0 does once a step counts: the step's metrics line, evaluations and checkpoints.

use super::coordinator_link::rpc;
use super::telemetry;
use super::worker::Worker;
use anyhow::Result;
use ferry_engine::checkpoint::{self, TrainerState};
use ferry_rpc::proto;
use serde_json::json;
use tonic::Code;

/// What rank 0 logs of a step once it counts: `step` is the number of steps committed with it.
#[derive(Clone, Debug)]
pub(super) struct StepRecord {
    pub(super) step: u64,
    pub(super) generation: u64,
    pub(super) loss: f64,
    pub(super) lr: f64,
    pub(super) grad_norm: f64,
    pub(super) secs: f64,
    pub(super) tokens_per_s: f64,
    pub(super) allreduce_s: f64,
    /// Waiting for the coordinator: the plan and the commit.
    pub(super) coordinator_s: f64,
    pub(super) world: u32,
}

impl Worker {
    /// Rank 0, once a step counts: its metrics line, and the evaluation and checkpoint due.
    pub(super) fn after_step(&mut self, r: &StepRecord) -> Result<()> {
        let StepRecord {
            step,
            loss,
            lr,
            world,
            ..
        } = *r;
        let tps = r.tokens_per_s;
        let mfu = telemetry::model_flops_utilization(
            self.engine.flops_per_token,
            tps,
            self.engine.peak_gflops,
            world,
        );
        if let Some(log) = &mut self.metrics {
            log.write(&json!({
                "event": "step", "step": step, "loss": loss, "lr": lr, "grad_norm": r.grad_norm,
                "tokens": step * self.spec.batch.global * self.spec.data.seq_len,
                "step_ms": r.secs * 1e3, "allreduce_ms": r.allreduce_s * 1e3,
                "coordinator_ms": r.coordinator_s * 1e3, "tokens_per_s": tps,
                "mfu": mfu, "world_size": world, "generation": r.generation,
            }))?;
        }
        if step % 10 == 0 || step == self.spec.job.steps {
            eprintln!(
                "step {step:>6}/{}  loss {loss:.4}  lr {lr:.2e}  {tps:.0} tok/s  world {world}",
                self.spec.job.steps
            );
        }
        let eval_every = self.spec.eval.every;
        let ck = self.spec.checkpoint.every;
        let due = (eval_every > 0 && step % eval_every == 0) || (ck > 0 && step % ck == 0);
        // Evaluations and checkpoints are of the weights at `step`. Rank 0 commits such a step
        // before it trains on, so they are; a commit answered only after more steps (the
        // group changed at that moment) skips them rather than label newer weights as `step`.
        if due && self.state_step != Some(step) {
            eprintln!(
                "step {step}: no evaluation or checkpoint; this rank's weights are at step {} \
                 (the step's commit was answered later)",
                self.state_step.unwrap_or(0)
            );
            return Ok(());
        }
        if eval_every > 0 && step % eval_every == 0 {
            self.evaluate(step)?;
        }
        if ck > 0 && step % ck == 0 {
            self.checkpoint(step)?;
        }
        Ok(())
    }

    /// Rank 0's held-out evaluation, printed and logged.
    fn evaluate(&mut self, step: u64) -> Result<()> {
        let report = self.engine.evaluate()?;
        eprintln!("{}", report.summary(step));
        if let Some(log) = &mut self.metrics {
            log.write(&report.record(step))?;
        }
        Ok(())
    }

    fn checkpoint(&mut self, step: u64) -> Result<()> {
        let state = TrainerState {
            step,
            samples_seen: step * self.spec.batch.global,
            tokens_seen: step * self.spec.batch.global * self.spec.data.seq_len,
            seed: self.spec.job.seed,
            rng_derivation:
                "splitmix64(seed, epoch) sample order; dropout seed = mix(seed, step, micro_batch)"
                    .into(),
            optimizer_steps: self.engine.opt.steps(),
            last_loss: None,
        };
        let run_dir = self.spec.job.run_dir.clone();
        let dir = self.engine.save_checkpoint(&run_dir, &state)?;
        checkpoint::prune(&run_dir, self.spec.checkpoint.keep as usize)?;
        if let Some(log) = &mut self.metrics {
            log.write(&json!({"event": "checkpoint", "step": step, "path": dir}))?;
        }
        let req = proto::CheckpointReport {
            worker_id: self.id(),
            generation: self.generation,
            step,
            path: dir.display().to_string(),
            ..Default::default()
        };
        let reported = self.call_status(|mut c| {
            let req = req.clone();
            async move { c.report_checkpoint(req).await }
        });
        match reported {
            Ok(_) => Ok(()),
            // Refused, e.g. the group changed since this step: the checkpoint stays on disk
            // and the next one is reported; the coordinator restores only what it recorded.
            Err(s)
                if matches!(
                    s.code(),
                    Code::PermissionDenied | Code::FailedPrecondition | Code::OutOfRange
                ) =>
            {
                eprintln!(
                    "checkpoint of step {step} not recorded by the coordinator: {}",
                    s.message()
                );
                Ok(())
            }
            Err(s) => Err(rpc(&self.coordinator, "report_checkpoint", s)),
        }
    }

    /// At the end (finished or stopped), rank 0 leaves a checkpoint of the last step.
    pub(super) fn finish(&mut self) -> Result<()> {
        let step = self.state_step.unwrap_or(0);
        if self.last_rank != Some(0) || step == 0 {
            return Ok(());
        }
        let every = self.spec.eval.every;
        if every > 0 && step % every != 0 {
            self.evaluate(step)?;
        }
        let exists = checkpoint::list(&self.spec.job.run_dir)?
            .iter()
            .any(|(s, _)| *s == step);
        if !exists {
            self.checkpoint(step)?;
        }
        Ok(())
    }
}
