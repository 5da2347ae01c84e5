//! [`TrainConfig`], the settings of a training run: its defaults, its checks, and how a
//! cluster job's spec becomes one.

use crate::error::{EngineError, Result};
use crate::models::{Family, ModelConfig};
use crate::schedule::Decay;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Everything that defines a training run; saved as `train.json` in the run directory.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Model family: gpt2, gpt or bert (the job spec's type; `train.json` holds its name).
    pub model: Family,
    /// Named size: tiny, mini, small, base, medium, large.
    pub size: String,
    /// Per-field overrides of the model config, `field=value`.
    pub overrides: Vec<String>,
    /// A directory written by `ferry prepare`.
    pub data: PathBuf,
    /// Tokens per training sequence; defaults to the model's context length.
    pub seq_len: Option<i64>,
    /// Start from this checkpoint's (or run directory's newest checkpoint's) weights instead
    /// of a fresh initialisation; the optimizer and step count start anew.
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    /// Sequences per optimizer step, whatever the number of processes.
    pub global_batch: u64,
    /// Sequences per forward/backward pass.
    pub micro_batch: u64,
    pub steps: u64,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub decay: Decay,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub grad_clip: f64,
    pub eval_interval: u64,
    pub eval_sequences: u64,
    pub checkpoint_interval: u64,
    pub keep_checkpoints: usize,
    pub seed: u64,
    /// libtorch intra-op threads; 0 = one per core.
    pub threads: usize,
    /// auto, cpu, cuda or cuda:N.
    pub device: String,
}

impl Default for TrainConfig {
    /// The optimizer, schedule, eval and checkpoint defaults are the job spec's, so a local
    /// `ferry train` and a cluster job with the same fields left out train the same way.
    fn default() -> Self {
        use ferry_spec::job::{CheckpointSection, EvalSection, OptimizerSection};
        TrainConfig::from_sections(
            &OptimizerSection::default(),
            &EvalSection::default(),
            &CheckpointSection::default(),
        )
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, message: String| {
            Err(EngineError::Config {
                field: field.into(),
                message,
            })
        };
        ModelConfig::sized(self.model, &self.size, 1)?;
        if self.micro_batch == 0 || self.global_batch == 0 {
            return bad(
                "micro_batch",
                "global_batch and micro_batch must be positive".into(),
            );
        }
        if self.global_batch % self.micro_batch != 0 {
            return bad(
                "global_batch",
                format!(
                    "{} is not a multiple of micro_batch {}",
                    self.global_batch, self.micro_batch
                ),
            );
        }
        if self.steps == 0 {
            return bad("steps", "must be positive".into());
        }
        if !(self.lr > 0.0) || self.min_lr < 0.0 || self.min_lr > self.lr {
            return bad(
                "lr",
                format!(
                    "need 0 <= min_lr ({}) <= lr ({}) and lr > 0",
                    self.min_lr, self.lr
                ),
            );
        }
        Ok(())
    }

    /// The model's config for a vocabulary: the named size, its context stretched to
    /// `seq_len` if that is longer, then the overrides.
    pub fn model_config(&self, vocab_size: i64) -> Result<ModelConfig> {
        let mut c = ModelConfig::sized(self.model, &self.size, vocab_size)?;
        if let Some(t) = self.seq_len {
            c.set_context(c.context().max(t));
        }
        let c = c.with_overrides(&self.overrides)?;
        c.validate()?;
        let shortest = c.family().shortest_seq_len() as i64;
        if let Some(t) = self.seq_len.filter(|&t| t < shortest || t > c.context()) {
            return Err(EngineError::Config {
                field: "seq_len".into(),
                message: format!(
                    "{t} must be between {shortest} and the model's {} ({})",
                    c.context_field(),
                    c.context()
                ),
            });
        }
        Ok(c)
    }
}

impl TrainConfig {
    /// The engine settings of a cluster job: what every worker of the job trains with.
    /// `threads` and `device` are the worker's own.
    pub fn from_job(spec: &ferry_spec::job::JobSpec, threads: usize, device: &str) -> TrainConfig {
        TrainConfig {
            model: spec.model.family,
            size: spec.model.size.clone(),
            overrides: spec.override_strings(),
            data: spec.data.shards.clone(),
            seq_len: Some(spec.data.seq_len as i64),
            init_from: spec.model.init_from.clone(),
            global_batch: spec.batch.global,
            micro_batch: spec.batch.micro,
            steps: spec.job.steps,
            seed: spec.job.seed,
            threads,
            device: device.into(),
            ..TrainConfig::from_sections(&spec.optimizer, &spec.eval, &spec.checkpoint)
        }
    }

    /// The single-process defaults with the job spec's optimizer, eval and checkpoint settings.
    fn from_sections(
        o: &ferry_spec::job::OptimizerSection,
        e: &ferry_spec::job::EvalSection,
        c: &ferry_spec::job::CheckpointSection,
    ) -> TrainConfig {
        TrainConfig {
            model: Family::Gpt2,
            size: "tiny".into(),
            overrides: Vec::new(),
            data: PathBuf::from("data-prepared"),
            seq_len: None,
            init_from: None,
            global_batch: 16,
            micro_batch: 8,
            steps: 300,
            lr: o.lr,
            min_lr: o.min_lr,
            warmup_steps: o.warmup_steps,
            decay: o.decay,
            weight_decay: o.weight_decay,
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.eps,
            grad_clip: o.grad_clip,
            eval_interval: e.every,
            eval_sequences: e.sequences,
            checkpoint_interval: c.every,
            keep_checkpoints: c.keep as usize,
            seed: ferry_spec::job::DEFAULT_SEED,
            threads: 0,
            device: "auto".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_spec::job::JobSpec;

    /// A cluster job is checked by the job spec, `ferry train` by the engine's config: the
    /// two must draw the line for `seq_len` at the same place. They did not (2 and 1 for the
    /// causal families).
    #[test]
    fn the_job_spec_and_the_engine_agree_on_the_shortest_seq_len() {
        for family in Family::ALL {
            let shortest = family.shortest_seq_len();
            for (seq_len, ok) in [(shortest, true), (shortest - 1, false)] {
                let toml = format!(
                    "[job]\nname = \"x\"\nsteps = 1\nrun_dir = \"runs/x\"\n\n[model]\n\
                     family = \"{}\"\nsize = \"tiny\"\n\n[data]\nshards = \"d\"\nseq_len = \
                     {seq_len}\n\n[batch]\nglobal = 4\nmicro = 2\n",
                    family.name()
                );
                let by_spec = JobSpec::from_toml(&toml, "job.toml");
                let cfg = TrainConfig {
                    model: family,
                    seq_len: Some(seq_len as i64),
                    ..TrainConfig::default()
                };
                let by_engine = cfg.model_config(100);
                assert_eq!(
                    by_spec.is_ok(),
                    ok,
                    "{} {seq_len}: {by_spec:?}",
                    family.name()
                );
                assert_eq!(
                    by_engine.is_ok(),
                    ok,
                    "{} {seq_len}: {by_engine:?}",
                    family.name()
                );
            }
        }
    }
}
