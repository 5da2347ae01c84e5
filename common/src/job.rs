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

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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
    pub fn name(self) -> &'static str {
        match self {
            ModelFamily::Gpt2 => "gpt2",
            ModelFamily::Gpt => "gpt",
            ModelFamily::Bert => "bert",
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
            JobSpecError::Invalid { location, message }
        })?;
        spec.validate(text, origin)?;
        Ok(spec)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a JobSpec always serialises")
    }

    fn validate(&self, text: &str, origin: &str) -> Result<(), JobSpecError> {
        let err = |field: &str, message: String| {
            let location = match line_of(text, field) {
                Some(l) => format!("{origin}:{l}"),
                None => origin.to_string(),
            };
            Err(JobSpecError::Invalid {
                location,
                message: format!("{field}: {message}"),
            })
        };
        let j = &self.job;
        if j.name.trim().is_empty() {
            return err("job.name", "must not be empty".into());
        }
        if j.steps == 0 {
            return err("job.steps", "must be at least 1".into());
        }
        if j.run_dir.as_os_str().is_empty() {
            return err("job.run_dir", "must not be empty".into());
        }
        let family = self.model.family;
        let Some(context) = family.context_length(&self.model.size) else {
            return err(
                "model.size",
                format!(
                    "`{}` is not a size of {}; allowed: {}",
                    self.model.size,
                    family.name(),
                    MODEL_SIZES.join(", ")
                ),
            );
        };
        let context_field = family.context_field();
        let context = match self.model.overrides.get(context_field) {
            Some(v) => match v.as_integer() {
                Some(n) if n > 0 => n as u64,
                _ => {
                    return err(
                        &format!("model.overrides.{context_field}"),
                        format!("must be a positive integer, got {v}"),
                    )
                }
            },
            None => context,
        };
        // Dropout probabilities (GPT-2 and GPT `*_pdrop`, BERT `*_dropout_prob`) in [0, 1).
        for (key, v) in &self.model.overrides {
            if !(key.ends_with("_pdrop") || key.ends_with("_dropout_prob")) {
                continue;
            }
            let p = v.as_float().or(v.as_integer().map(|i| i as f64));
            if !p.is_some_and(|p| (0.0..1.0).contains(&p)) {
                return err(
                    &format!("model.overrides.{key}"),
                    format!("a dropout probability must be in [0, 1), got {v}"),
                );
            }
        }
        if self.data.shards.as_os_str().is_empty() {
            return err(
                "data.shards",
                "must name a directory written by `ferry prepare`".into(),
            );
        }
        // A BERT example needs [CLS] a [SEP] b [SEP]; a causal window an input and a target.
        let shortest = if family == ModelFamily::Bert { 5 } else { 2 };
        if self.data.seq_len < shortest || self.data.seq_len > context {
            return err(
                "data.seq_len",
                format!(
                    "{} is outside {shortest}..={context} (the model's context length)",
                    self.data.seq_len
                ),
            );
        }
        let b = &self.batch;
        if b.global == 0 {
            return err("batch.global", "must be at least 1".into());
        }
        if b.micro == 0 || b.global % b.micro != 0 {
            return err(
                "batch.micro",
                format!("{} does not divide batch.global = {}", b.micro, b.global),
            );
        }
        let o = &self.optimizer;
        if !(o.lr > 0.0 && o.lr.is_finite()) {
            return err(
                "optimizer.lr",
                format!("must be a positive number, got {}", o.lr),
            );
        }
        if !(o.min_lr >= 0.0 && o.min_lr <= o.lr) {
            return err(
                "optimizer.min_lr",
                format!(
                    "must be within 0..=optimizer.lr ({}), got {}",
                    o.lr, o.min_lr
                ),
            );
        }
        if !(o.weight_decay >= 0.0 && o.weight_decay.is_finite()) {
            return err(
                "optimizer.weight_decay",
                format!("must be >= 0, got {}", o.weight_decay),
            );
        }
        for (field, v) in [("optimizer.beta1", o.beta1), ("optimizer.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return err(field, format!("must be in [0, 1), got {v}"));
            }
        }
        if !(o.eps > 0.0) {
            return err("optimizer.eps", format!("must be positive, got {}", o.eps));
        }
        if !(o.grad_clip >= 0.0) {
            return err(
                "optimizer.grad_clip",
                format!("must be >= 0 (0 disables clipping), got {}", o.grad_clip),
            );
        }
        if self.checkpoint.keep == 0 {
            return err("checkpoint.keep", "must be at least 1".into());
        }
        if self.eval.every > 0 && self.eval.sequences == 0 {
            return err(
                "eval.sequences",
                "must be at least 1 when eval.every > 0".into(),
            );
        }
        let c = &self.cluster;
        if c.min_workers == 0 {
            return err("cluster.min_workers", "must be at least 1".into());
        }
        let micro_batches = b.global / b.micro;
        if u64::from(c.min_workers) > micro_batches {
            return err(
                "cluster.min_workers",
                format!(
                    "{} exceeds the micro-batches per step (batch.global / batch.micro = {micro_batches}); \
                     a worker needs at least one micro-batch",
                    c.min_workers
                ),
            );
        }
        if let Some(max) = c.max_workers {
            if max < c.min_workers {
                return err(
                    "cluster.max_workers",
                    format!("{max} is below cluster.min_workers = {}", c.min_workers),
                );
            }
            if u64::from(max) > micro_batches {
                return err(
                    "cluster.max_workers",
                    format!(
                        "{max} exceeds the micro-batches per step (batch.global / batch.micro = {micro_batches}); \
                         a worker needs at least one micro-batch"
                    ),
                );
            }
        }
        if !(c.bucket_mib >= 0.0625 && c.bucket_mib <= 4096.0) {
            return err(
                "cluster.bucket_mib",
                format!("must be within 0.0625..=4096 MiB, got {}", c.bucket_mib),
            );
        }
        for (field, v) in [
            ("cluster.heartbeat_timeout_s", c.heartbeat_timeout_s),
            ("cluster.collective_timeout_s", c.collective_timeout_s),
        ] {
            if !(v >= 0.1 && v <= 86_400.0) {
                return err(
                    field,
                    format!("must be within 0.1..=86400 seconds, got {v}"),
                );
            }
        }
        if !(c.settle_s >= 0.0 && c.settle_s <= 3600.0) {
            return err(
                "cluster.settle_s",
                format!("must be within 0..=3600 seconds, got {}", c.settle_s),
            );
        }
        Ok(())
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

/// The line (1-based) and dotted field name at byte `offset` of a TOML text.
fn field_at(text: &str, offset: usize) -> (Option<usize>, Option<String>) {
    let offset = offset.min(text.len());
    let line_no = text[..offset].matches('\n').count() + 1;
    let mut section = String::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            section = name.trim().to_string();
        }
        if i + 1 == line_no {
            let key = t.split('=').next().map(str::trim).unwrap_or("");
            let field = if t.starts_with('[') || key.is_empty() || !t.contains('=') {
                None
            } else if section.is_empty() {
                Some(key.to_string())
            } else {
                Some(format!("{section}.{key}"))
            };
            return (Some(line_no), field);
        }
    }
    (Some(line_no), None)
}

/// The line (1-based) where a dotted field such as `batch.micro` is set, if it is.
fn line_of(text: &str, field: &str) -> Option<usize> {
    let (want_section, want_key) = field.rsplit_once('.').unwrap_or(("", field));
    let mut section = String::new();
    let mut section_line = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            section = name.trim().to_string();
            if section == want_section {
                section_line = Some(i + 1);
            }
            continue;
        }
        if section == want_section {
            if let Some((key, _)) = t.split_once('=') {
                if key.trim() == want_key {
                    return Some(i + 1);
                }
            }
        }
    }
    section_line
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const MINIMAL: &str = r#"
[job]
name = "t"
steps = 20
run_dir = "runs/t"

[model]
family = "gpt2"
size = "tiny"

[data]
shards = "data"
seq_len = 64

[batch]
global = 16
micro = 4
"#;

    #[test]
    fn minimal_spec_gets_defaults_and_round_trips() {
        let spec = JobSpec::from_toml(MINIMAL, "job.toml").unwrap();
        assert_eq!(spec.max_workers(), 4);
        assert_eq!(spec.optimizer.decay, Decay::Cosine);
        let again = JobSpec::from_toml(&spec.to_toml(), "again.toml").unwrap();
        assert_eq!(spec, again);
    }

    fn error_of(text: &str) -> String {
        JobSpec::from_toml(text, "job.toml")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn dropout_overrides_outside_0_1_are_refused() {
        let with =
            |o: &str| MINIMAL.replace("[data]", &format!("[model.overrides]\n{o}\n\n[data]"));
        for bad in [
            "resid_pdrop = 1.5",
            "hidden_dropout_prob = -0.1",
            "attn_pdrop = 1",
        ] {
            let e = error_of(&with(bad));
            let key = bad.split(' ').next().unwrap();
            assert!(
                e.starts_with(&format!("job.toml:12: model.overrides.{key}: ")),
                "{e}"
            );
        }
        JobSpec::from_toml(&with("resid_pdrop = 0.1\nembd_pdrop = 0"), "job.toml").unwrap();
    }

    #[test]
    fn errors_name_line_field_and_allowed_values() {
        let e = error_of(&MINIMAL.replace("family = \"gpt2\"", "family = \"gpt5\""));
        assert!(e.starts_with("job.toml:8:"), "{e}");
        assert!(e.contains("model.family") && e.contains("gpt2"), "{e}");

        let e = error_of(&MINIMAL.replace("micro = 4", "micro = 5"));
        assert_eq!(
            e,
            "job.toml:17: batch.micro: 5 does not divide batch.global = 16"
        );

        let e = error_of(&MINIMAL.replace("size = \"tiny\"", "size = \"huge\""));
        assert!(
            e.starts_with("job.toml:9: model.size") && e.contains("tiny, mini"),
            "{e}"
        );

        let e = error_of(&MINIMAL.replace("seq_len = 64", "seq_len = 4096"));
        assert!(e.starts_with("job.toml:13: data.seq_len"), "{e}");

        let e = error_of(&format!("{MINIMAL}\n[cluster]\nbackend = \"mpi\"\n"));
        assert!(e.contains("cluster.backend") && e.contains("ring"), "{e}");

        let e = error_of(&format!("{MINIMAL}\n[cluster]\nmax_workers = 5\n"));
        assert!(e.contains("cluster.max_workers: 5 exceeds"), "{e}");

        let e = error_of(&MINIMAL.replace("steps = 20", "steps = 20\nstpes = 3"));
        assert!(e.contains("stpes"), "{e}");

        let e = error_of(&MINIMAL.replace("[batch]\nglobal = 16\nmicro = 4\n", ""));
        assert!(e.contains("batch"), "{e}");
        assert!(!e.contains('\n'));
    }
    #[test]
    fn gradient_dtype_is_fp32_by_default_and_left_out_of_specs_that_keep_it() {
        let spec = JobSpec::from_toml(MINIMAL, "job.toml").unwrap();
        assert_eq!(spec.cluster.gradient_dtype, GradientDtype::Fp32);
        assert!(!spec.to_toml().contains("gradient_dtype"));
        assert!(spec.cluster.overlap_backward);
        assert!(!spec.to_toml().contains("overlap_backward"));
        assert_eq!(spec.cluster.bucket_mib, DEFAULT_BUCKET_MIB);
        assert!(!spec.to_toml().contains("bucket_mib"));
        let e = error_of(&format!("{MINIMAL}\n[cluster]\nbucket_mib = 0.0\n"));
        assert!(e.contains("cluster.bucket_mib"), "{e}");
        let bf16 = format!("{MINIMAL}\n[cluster]\ngradient_dtype = \"bf16\"\n");
        let spec = JobSpec::from_toml(&bf16, "job.toml").unwrap();
        assert_eq!(spec.cluster.gradient_dtype, GradientDtype::Bf16);
        assert!(spec.to_toml().contains("gradient_dtype = \"bf16\""));
        let e = error_of(&format!("{MINIMAL}\n[cluster]\ngradient_dtype = \"fp8\"\n"));
        assert!(e.contains("gradient_dtype") && e.contains("bf16"), "{e}");
    }

    #[test]
    fn init_from_is_optional_and_left_out_of_specs_without_it() {
        let spec = JobSpec::from_toml(MINIMAL, "job.toml").unwrap();
        assert_eq!(spec.model.init_from, None);
        // Specs written before the field existed serialize as they did.
        assert!(!spec.to_toml().contains("init_from"));
        let with = MINIMAL.replace("[data]", "init_from = \"runs/base\"\n\n[data]");
        let spec = JobSpec::from_toml(&with, "job.toml").unwrap();
        assert_eq!(spec.model.init_from, Some(PathBuf::from("runs/base")));
        let again = JobSpec::from_toml(&spec.to_toml(), "again.toml").unwrap();
        assert_eq!(spec, again);
    }
}
