//! The job spec: one TOML file that says everything about a cluster pretraining job.
//!
//! It is validated completely before anything starts. Every error names the file, the line,
//! the field (`section.key`) and what is allowed, e.g.
//! `job.toml:14: batch.micro = 5 does not divide batch.global = 16`.
//!
//! ```toml
//! [job]
//! name = "gpt2-mini-wikitext"
//! steps = 600
//! run_dir = "runs/gpt2-mini"
//!
//! [model]
//! family = "gpt2"
//! size = "mini"
//!
//! [data]
//! shards = "data-prepared/wikitext-books"
//! seq_len = 128
//!
//! [batch]
//! global = 16
//! micro = 8
//! ```

#[cfg(test)]
mod tests;
mod validate;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use validate::{field_at, one_line};

/// The named model sizes every family offers, smallest first.
pub const MODEL_SIZES: [&str; 6] = ["tiny", "mini", "small", "base", "medium", "large"];

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ModelFamily {
    /// GPT-2 (Radford et al. 2019), byte-level BPE.
    Gpt2,
    /// The original GPT (Radford et al. 2018), BPE with `</w>` word ends.
    Gpt,
    /// BERT (Devlin et al. 2019): masked LM + next-sentence prediction, WordPiece.
    Bert,
}

impl ModelFamily {
    pub const ALL: [ModelFamily; 3] = [ModelFamily::Gpt2, ModelFamily::Gpt, ModelFamily::Bert];

    /// The family of a name jobs and the CLI use (`gpt2`, `gpt`, `bert`).
    pub fn from_name(name: &str) -> Option<ModelFamily> {
        ModelFamily::ALL.into_iter().find(|f| f.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            ModelFamily::Gpt2 => "gpt2",
            ModelFamily::Gpt => "gpt",
            ModelFamily::Bert => "bert",
        }
    }

    /// `model_type` in a `transformers` `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            ModelFamily::Gpt2 => "gpt2",
            ModelFamily::Gpt => "openai-gpt",
            ModelFamily::Bert => "bert",
        }
    }

    /// The base-model prefix of the family's tensor names; `transformers` checkpoints of the
    /// bare base model (`GPT2Model`, `BertModel`) leave it out.
    pub fn base_prefix(self) -> &'static str {
        match self {
            ModelFamily::Gpt2 | ModelFamily::Gpt => "transformer.",
            ModelFamily::Bert => "bert.",
        }
    }

    /// Whether the family is a causal LM (trained on next tokens, can generate).
    pub fn is_causal(self) -> bool {
        !matches!(self, ModelFamily::Bert)
    }

    /// The shortest `seq_len` a training example of the family fits in. A causal window is
    /// `seq_len + 1` tokens (inputs and their next tokens), so one token of input will do; a
    /// BERT example needs [CLS] a [SEP] b [SEP].
    pub fn shortest_seq_len(self) -> u64 {
        match self {
            ModelFamily::Bert => 5,
            ModelFamily::Gpt2 | ModelFamily::Gpt => 1,
        }
    }

    /// Context length of a named size; must agree with the model code (a worker test checks).
    pub fn context_length(self, size: &str) -> Option<u64> {
        if !MODEL_SIZES.contains(&size) {
            return None;
        }
        let small = matches!(size, "tiny" | "mini" | "small");
        Some(match self {
            ModelFamily::Gpt2 if small => 256,
            ModelFamily::Gpt2 => 1024,
            ModelFamily::Gpt if small => 256,
            ModelFamily::Gpt => 512,
            ModelFamily::Bert => 512,
        })
    }

    /// The `config.json` field holding the context length, overridable in `model.overrides`.
    pub fn context_field(self) -> &'static str {
        match self {
            ModelFamily::Bert => "max_position_embeddings",
            ModelFamily::Gpt2 | ModelFamily::Gpt => "n_positions",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    Cosine,
    Linear,
    Constant,
}

/// Which collective the workers use: `auto` picks NCCL when every worker has a GPU, else ring.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Auto,
    Ring,
    Nccl,
}

/// How gradients travel between workers. `bf16` halves the bytes: each partial sum is rounded to
/// bfloat16 on the wire and added in float32, and the final sums are bfloat16 values on every
/// rank. Weights, optimizer state and the loss stay float32.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum GradientDtype {
    #[default]
    Fp32,
    Bf16,
}

impl GradientDtype {
    pub fn is_fp32(&self) -> bool {
        *self == GradientDtype::Fp32
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub job: JobSection,
    pub model: ModelSection,
    pub data: DataSection,
    pub batch: BatchSection,
    #[serde(default)]
    pub optimizer: OptimizerSection,
    #[serde(default)]
    pub checkpoint: CheckpointSection,
    #[serde(default)]
    pub eval: EvalSection,
    #[serde(default)]
    pub cluster: ClusterSection,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobSection {
    pub name: String,
    pub steps: u64,
    /// Where rank 0 writes checkpoints and metrics (a shared filesystem on a cluster).
    pub run_dir: PathBuf,
    #[serde(default = "default_seed")]
    pub seed: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub family: ModelFamily,
    pub size: String,
    /// Per-field overrides of the model's `config.json`, e.g. `n_layer = 2`.
    #[serde(default)]
    pub overrides: BTreeMap<String, toml::Value>,
    /// Start from these weights instead of a fresh initialisation: a checkpoint or a run
    /// directory (its newest checkpoint) of the same architecture and tokenizer, e.g. to go on
    /// pretraining a model on a task's own text. The optimizer and the step count start anew.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// A directory written by `ferry prepare`.
    pub shards: PathBuf,
    /// Tokens per training sequence.
    pub seq_len: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BatchSection {
    /// Sequences per optimizer step, whatever the number of workers.
    pub global: u64,
    /// Sequences per forward/backward pass on one worker.
    pub micro: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerSection {
    pub name: OptimizerName,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub decay: Decay,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub grad_clip: f64,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerName {
    #[default]
    Adamw,
}

impl Default for OptimizerSection {
    fn default() -> Self {
        OptimizerSection {
            name: OptimizerName::Adamw,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 30,
            decay: Decay::Cosine,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    /// Steps between checkpoints; 0 = only at the end.
    pub every: u64,
    /// How many checkpoints to keep (the newest).
    pub keep: u64,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        CheckpointSection {
            every: 100,
            keep: 3,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Steps between held-out evaluations; 0 = never.
    pub every: u64,
    pub sequences: u64,
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection {
            every: 100,
            sequences: 64,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// The job waits until this many workers are present (quorum).
    pub min_workers: u32,
    /// Workers beyond this stay on standby. Default (unset): one per micro-batch of a step.
    pub max_workers: Option<u32>,
    pub backend: Backend,
    /// A worker silent for this long is declared dead and the group re-forms without it.
    pub heartbeat_timeout_s: f64,
    /// Collective operations fail after this long without progress (dead peer, never a hang).
    pub collective_timeout_s: f64,
    /// After enough workers for a quorum are present, wait this long for more before forming.
    pub settle_s: f64,
    /// Every this many steps, ranks compare a parameter checksum.
    pub checksum_every: u64,
    /// `fp32` or `bf16` gradients between workers. Left out of serialized specs when fp32,
    /// so the ids of jobs written before it existed do not change.
    #[serde(skip_serializing_if = "GradientDtype::is_fp32")]
    pub gradient_dtype: GradientDtype,
    /// Reduce gradient buckets while backward still runs (DDP's overlap); `false` reduces
    /// after backward. Both give bit-identical weights. Left out of serialized specs when true.
    #[serde(skip_serializing_if = "is_true")]
    pub overlap_backward: bool,
    /// Gradients are summed in buckets of at most this many MiB (DDP's `bucket_cap_mb`):
    /// smaller ones start sooner during backward, larger ones cost fewer round trips.
    #[serde(skip_serializing_if = "is_default_bucket")]
    pub bucket_mib: f64,
    /// Rank 0 commits the group's steps to the coordinator once this many have been trained
    /// since its last commit (1: every step). Larger values take the coordinator further off
    /// the step path; a crash then redoes at most the steps not yet committed, and joins and
    /// leaves wait for the next commit. Left out of serialized specs when 1.
    #[serde(skip_serializing_if = "is_one")]
    pub commit_every: u64,
    /// ... or once the oldest uncommitted step is this many seconds old, whichever comes
    /// first (0: no time limit). Left out of serialized specs when 0.
    #[serde(skip_serializing_if = "is_zero")]
    pub commit_interval_s: f64,
}

fn is_one(v: &u64) -> bool {
    *v == 1
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

/// `cluster.bucket_mib` unless the job says otherwise. Smaller than DDP's 25 MiB: on two
/// hosts at 1 Gbit and 200 Mbit, 4 MiB buckets left 0.14 s and 1.2 s of a GPT-2 cpu-small
/// step's all-reduce after backward where 25 MiB left 0.38 s and 1.9 s (BENCHMARKS.md).
pub const DEFAULT_BUCKET_MIB: f64 = 4.0;

fn is_default_bucket(v: &f64) -> bool {
    *v == DEFAULT_BUCKET_MIB
}

fn is_true(b: &bool) -> bool {
    *b
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            min_workers: 1,
            max_workers: None,
            backend: Backend::Auto,
            heartbeat_timeout_s: 10.0,
            collective_timeout_s: 60.0,
            settle_s: 2.0,
            checksum_every: 50,
            gradient_dtype: GradientDtype::Fp32,
            overlap_backward: true,
            bucket_mib: DEFAULT_BUCKET_MIB,
            commit_every: 1,
            commit_interval_s: 0.0,
        }
    }
}

/// The seed when a job or run names none.
pub const DEFAULT_SEED: u64 = 1234;

fn default_seed() -> u64 {
    DEFAULT_SEED
}

/// A job spec that cannot be used; the message is complete and on one line.
#[derive(thiserror::Error, Debug)]
pub enum JobSpecError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{location}: {message}")]
    Invalid { location: String, message: String },
}

impl JobSpec {
    /// Reads and validates a job file. Relative paths in it are taken relative to the
    /// current directory, like every other path a user types.
    pub fn from_file(path: &Path) -> Result<JobSpec, JobSpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| JobSpecError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        JobSpec::from_toml(&text, &path.display().to_string())
    }

    /// Parses and validates TOML text; `origin` names it in errors (a file name).
    pub fn from_toml(text: &str, origin: &str) -> Result<JobSpec, JobSpecError> {
        let spec: JobSpec = toml::from_str(text).map_err(|e| {
            let (line, field) = match e.span() {
                Some(span) => field_at(text, span.start),
                None => (None, None),
            };
            let location = match line {
                Some(l) => format!("{origin}:{l}"),
                None => origin.to_string(),
            };
            let message = e.message().trim().replace('\n', " ");
            let message = match field {
                Some(f) if !message.contains(&f) => format!("{f}: {message}"),
                _ => message,
            };
            JobSpecError::Invalid {
                location,
                message: one_line(&message),
            }
        })?;
        spec.validate(text, origin)?;
        Ok(spec)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a JobSpec always serialises")
    }

    /// The most workers that train at once: `cluster.max_workers`, or one per micro-batch.
    pub fn max_workers(&self) -> u32 {
        let micro_batches = self.batch.global / self.batch.micro;
        self.cluster
            .max_workers
            .unwrap_or(micro_batches.min(u64::from(u32::MAX)) as u32)
    }

    /// Micro-batches in one global step.
    pub fn micro_batches(&self) -> u64 {
        self.batch.global / self.batch.micro
    }

    /// Overrides as `field=value` strings, the form the model code applies.
    pub fn override_strings(&self) -> Vec<String> {
        self.model
            .overrides
            .iter()
            .map(|(k, v)| match v {
                toml::Value::String(s) => format!("{k}={s}"),
                other => format!("{k}={other}"),
            })
            .collect()
    }
}
