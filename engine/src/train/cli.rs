//! `ferry train`: its arguments, and the rules for resuming a run (the saved config wins;
//! only what does not change the math may change).

use super::{RunSummary, TrainConfig};
use crate::schedule::Decay;
use anyhow::{Context, Result};
use clap::Args;
use std::io::IsTerminal;
use std::path::PathBuf;

/// Options left out take the saved run's values with --resume, else the defaults shown.
#[derive(Args)]
pub struct TrainArgs {
    /// Run directory: train.json, metrics.jsonl, checkpoints/.
    #[arg(long)]
    run_dir: PathBuf,
    /// Continue the run directory from its newest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Prepared data directory (from `ferry prepare`).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Model family: gpt2, gpt or bert [default: gpt2].
    #[arg(long)]
    model: Option<String>,
    /// Named size: tiny, mini, small, base, medium, large [default: tiny].
    #[arg(long)]
    size: Option<String>,
    /// Override a model config field, e.g. --set n_layer=4 (repeatable).
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    overrides: Vec<String>,
    /// Tokens per sequence [default: the model's context].
    #[arg(long)]
    seq_len: Option<i64>,
    /// Start from this checkpoint's (or run directory's newest) weights instead of a fresh
    /// initialisation, e.g. to go on pretraining on a task's texts; same architecture and
    /// tokenizer. The optimizer and step count start anew.
    #[arg(long)]
    init_from: Option<PathBuf>,
    /// Sequences per optimizer step [default: 16].
    #[arg(long)]
    global_batch: Option<u64>,
    /// Sequences per forward/backward pass [default: 8].
    #[arg(long)]
    micro_batch: Option<u64>,
    /// Optimizer steps in total [default: 300].
    #[arg(long)]
    steps: Option<u64>,
    /// Peak learning rate [default: 1e-3].
    #[arg(long)]
    lr: Option<f64>,
    /// Final learning rate [default: 1e-4].
    #[arg(long)]
    min_lr: Option<f64>,
    /// Linear warmup steps [default: 30].
    #[arg(long)]
    warmup_steps: Option<u64>,
    /// Decay after warmup [default: cosine].
    #[arg(long, value_enum)]
    decay: Option<Decay>,
    /// AdamW weight decay on matrices and embeddings [default: 0.1].
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Global gradient-norm clip, 0 = off [default: 1.0].
    #[arg(long)]
    grad_clip: Option<f64>,
    /// Held-out evaluation every N steps [default: 100].
    #[arg(long)]
    eval_interval: Option<u64>,
    /// Held-out sequences per evaluation [default: 64].
    #[arg(long)]
    eval_sequences: Option<u64>,
    /// Checkpoint every N steps [default: 100].
    #[arg(long)]
    checkpoint_interval: Option<u64>,
    /// Checkpoints kept [default: 3].
    #[arg(long)]
    keep_checkpoints: Option<usize>,
    /// Seed for initialisation, sample order and dropout [default: 1234].
    #[arg(long)]
    seed: Option<u64>,
    /// libtorch threads, 0 = one per core [default: 0].
    #[arg(long)]
    threads: Option<usize>,
    /// auto, cpu, cuda or cuda:N [default: auto].
    #[arg(long)]
    device: Option<String>,
    /// Hide the progress bar.
    #[arg(long)]
    no_progress: bool,
}

impl TrainArgs {
    /// Builds the run's config. Resuming keeps the saved config; only settings that do not
    /// change the math (length, intervals, threads, device) may be changed then.
    pub fn config(&self) -> Result<TrainConfig> {
        let mut c = if self.resume {
            super::load_run_config(&self.run_dir).context("--resume needs the run's train.json")?
        } else {
            TrainConfig::default()
        };
        let mut fixed = Vec::new();
        macro_rules! set {
            ($field:ident, $flag:literal, $changeable:expr) => {
                if let Some(v) = self.$field.clone() {
                    if self.resume && !$changeable && c.$field != v {
                        fixed.push($flag);
                    }
                    c.$field = v;
                }
            };
        }
        set!(data, "--data", false);
        if let Some(name) = &self.model {
            let family = crate::models::parse_family(name)?;
            if self.resume && c.model != family {
                fixed.push("--model");
            }
            c.model = family;
        }
        set!(size, "--size", false);
        set!(global_batch, "--global-batch", false);
        set!(micro_batch, "--micro-batch", false);
        set!(steps, "--steps", true);
        set!(lr, "--lr", false);
        set!(min_lr, "--min-lr", false);
        set!(warmup_steps, "--warmup-steps", false);
        set!(decay, "--decay", false);
        set!(weight_decay, "--weight-decay", false);
        set!(grad_clip, "--grad-clip", false);
        set!(eval_interval, "--eval-interval", true);
        set!(eval_sequences, "--eval-sequences", true);
        set!(checkpoint_interval, "--checkpoint-interval", true);
        set!(keep_checkpoints, "--keep-checkpoints", true);
        set!(seed, "--seed", false);
        set!(threads, "--threads", true);
        set!(device, "--device", true);
        if self.init_from.is_some() {
            if self.resume && c.init_from != self.init_from {
                fixed.push("--init-from");
            }
            c.init_from = self.init_from.clone();
        }
        if self.seq_len.is_some() {
            if self.resume && c.seq_len != self.seq_len {
                fixed.push("--seq-len");
            }
            c.seq_len = self.seq_len;
        }
        if !self.overrides.is_empty() {
            if self.resume && c.overrides != self.overrides {
                fixed.push("--set");
            }
            c.overrides = self.overrides.clone();
        }
        if !fixed.is_empty() {
            anyhow::bail!(
                "{}: {} cannot change when resuming (the run's train.json fixes them)",
                self.run_dir.join(super::TRAIN_CONFIG_FILE).display(),
                fixed.join(", ")
            );
        }
        Ok(c)
    }
}

impl TrainArgs {
    /// Trains as the arguments say, with a progress bar on a terminal.
    pub fn run(&self) -> Result<RunSummary> {
        let cfg = self.config()?;
        let progress = !self.no_progress && std::io::stderr().is_terminal();
        Ok(super::run(&cfg, &self.run_dir, self.resume, progress)?)
    }
}
