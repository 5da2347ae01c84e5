//! The single-process training loop: read it top to bottom in `run`.
//!
//! A step takes the global batch of the sample order, runs it as micro-batches with gradients
//! accumulated as sums of per-token losses divided by the step's token count, clips, and takes
//! an AdamW step. Every random choice derives from (seed, step, micro-batch index), so a run
//! resumed from a checkpoint retraces the uninterrupted one exactly.

pub mod cli;
mod config;
pub mod trained_log;

pub use config::TrainConfig;
pub use trained_log::TrainedSamplesLog;

use crate::checkpoint::{self, TrainerState};
use crate::error::{EngineError, Result};
use crate::fsutil::{read_json, write_json};
use crate::metrics::MetricsLog;
use crate::models::{Family, Model, ModelConfig, ParamStore};
use crate::objective::{EvalReport, Objective};
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::runtime;
use crate::schedule::LrSchedule;
use crate::weights;
use ferry_dataset::sentence_pairs::{MaskingRule, PairBuilder, SpecialIds};
use ferry_dataset::shards::TokenSplit;
use ferry_spec::sampler::{mix_seed, SampleOrder};
use serde::Serialize;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::Device;

pub const TRAIN_CONFIG_FILE: &str = "train.json";
/// One JSON line per logged step, beside the checkpoints (the run directory's layout).
pub use ferry_spec::run_dir::METRICS_FILE;

/// What a finished run reports.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub steps: u64,
    pub first_val_loss: Option<f64>,
    pub last_val_loss: Option<f64>,
    pub last_loss: f64,
    pub tokens_per_s: f64,
    pub last_checkpoint: Option<PathBuf>,
}

pub(crate) struct Data {
    train: TokenSplit,
    val: TokenSplit,
    tokenizer_path: PathBuf,
}

/// Checks that `source` can start a new run of `family` on the data in `data_dir`: a model
/// of that family whose tokenizer is the one the data was prepared with, or its token ids
/// would mean other tokens. Returns the checkpoint it resolves to. Shapes are checked when
/// the weights are loaded ([`load_initial_weights`]).
fn check_initial_weights(
    source: &Path,
    family: Family,
    data_dir: &Path,
    manifest: &ferry_dataset::shards::Manifest,
) -> Result<PathBuf> {
    let (dir, theirs) = crate::pretrained::open_model_dir(source)?;
    if theirs.family() != family {
        return Err(EngineError::file(
            dir.join(checkpoint::CONFIG_FILE),
            format!(
                "is a {} model, and this run trains {}",
                theirs.family().name(),
                family.name()
            ),
        ));
    }
    let tokenizer_path = dir.join(checkpoint::TOKENIZER_FILE);
    let tokenizer =
        std::fs::read(&tokenizer_path).map_err(|e| EngineError::io(&tokenizer_path, e))?;
    if ferry_dataset::shards::sha256_hex(&tokenizer) != manifest.tokenizer_sha256 {
        return Err(EngineError::file(
            &tokenizer_path,
            format!(
                "is not the tokenizer {} was prepared with; prepare it again with \
                 `ferry prepare --tokenizer {}`",
                data_dir.display(),
                tokenizer_path.display()
            ),
        ));
    }
    Ok(dir)
}

impl TrainConfig {
    /// [`check_initial_weights`] for this config's `init_from`, when it has one: what
    /// `ferry launch` runs before it starts any worker, so that a wrong path or tokenizer is
    /// one error up front rather than every worker failing and being restarted.
    pub fn check_init_from(&self) -> Result<Option<PathBuf>> {
        let Some(source) = &self.init_from else {
            return Ok(None);
        };
        let manifest = ferry_dataset::shards::Manifest::load(&self.data)?;
        check_initial_weights(source, self.model, &self.data, &manifest).map(Some)
    }
}

/// Loads a pretrained model's weights into a fresh `ps` for a new run, after
/// [`check_initial_weights`]; tensor shapes must match. Returns the checkpoint read.
fn load_initial_weights(
    source: &Path,
    ps: &ParamStore,
    mc: &ModelConfig,
    data_dir: &Path,
    manifest: &ferry_dataset::shards::Manifest,
) -> Result<PathBuf> {
    let dir = check_initial_weights(source, mc.family(), data_dir, manifest)?;
    let model_path = dir.join(checkpoint::MODEL_FILE);
    weights::load_into(
        ps,
        &weights::load_safetensors(&model_path)?,
        mc.family().base_prefix(),
        &model_path,
    )?;
    Ok(dir)
}

/// Training state that lives across steps. Data parallelism (`ferry-dp`) drives one from
/// outside: its step in pieces, its optimizer state and parameters.
pub struct Engine {
    pub(crate) cfg: TrainConfig,
    pub device: Device,
    pub(crate) seq_len: i64,
    pub ps: ParamStore,
    pub(crate) model: Model,
    pub(crate) model_config: ModelConfig,
    pub(crate) objective: Objective,
    pub opt: AdamW,
    pub schedule: LrSchedule,
    pub(crate) order: SampleOrder,
    pub(crate) data: Data,
    pub flops_per_token: f64,
    pub peak_gflops: f64,
    pub(crate) precision: runtime::Precision,
    /// Where a data-parallel worker records the sequences it trains, when asked to
    /// ([`trained_log`]).
    pub trained_log: Option<TrainedSamplesLog>,
}

/// Starts a new run in `run_dir`, or continues its newest checkpoint when `resume` is set.
pub fn run(cfg: &TrainConfig, run_dir: &Path, resume: bool, progress: bool) -> Result<RunSummary> {
    cfg.validate()?;
    std::fs::create_dir_all(run_dir).map_err(|e| EngineError::io(run_dir, e))?;
    let config_path = run_dir.join(TRAIN_CONFIG_FILE);
    let resume_from = if resume { resume_point(run_dir)? } else { None };
    if let Some(point) = resume_from.as_ref().filter(|p| p.state.step > cfg.steps) {
        // Checked before train.json is rewritten, so the run keeps its own length.
        return Err(EngineError::Config {
            field: "steps".into(),
            message: format!(
                "{} is at step {}, past --steps {}: pass --steps {} or more to go on",
                point.dir.display(),
                point.state.step,
                cfg.steps,
                point.state.step
            ),
        });
    }
    if !resume && !checkpoint::list(run_dir)?.is_empty() {
        return Err(EngineError::file(
            run_dir,
            "already holds checkpoints: pass --resume to continue it, or choose a new --run-dir",
        ));
    }
    write_json(&config_path, cfg)?;

    let mut engine = Engine::new(cfg)?;
    let mut state = TrainerState {
        step: 0,
        samples_seen: 0,
        tokens_seen: 0,
        seed: cfg.seed,
        rng_derivation:
            "splitmix64(seed, epoch) sample order; dropout seed = mix(seed, step, micro_batch)"
                .into(),
        optimizer_steps: 0,
        last_loss: None,
    };
    if let Some(point) = &resume_from {
        state = engine.load_checkpoint(&point.dir, point.state.clone())?;
        eprintln!(
            "resuming {} at step {}{}",
            point.dir.display(),
            state.step,
            if point.passed_over > 0 {
                ", the newest checkpoint that verifies"
            } else {
                ""
            }
        );
    }
    let mut log = MetricsLog::open(
        &run_dir.join(METRICS_FILE),
        resume_from.as_ref().map(|_| state.step),
    )?;

    let mut first_val = None;
    if state.step == 0 {
        let report = engine.evaluate()?;
        log.write(&report.record(0))?;
        println!("{}", report.summary(0));
        first_val = Some(report.loss);
    }
    let bar = progress_bar(progress, cfg.steps, state.step);
    let tokens_per_step = cfg.global_batch * engine.seq_len as u64;
    let (mut last_val, mut last_ckpt, mut last_loss) = (None, None, f64::NAN);
    let run_start = Instant::now();
    let first_step = state.step;

    for step in state.step..cfg.steps {
        let t0 = Instant::now();
        let lr = engine.schedule.at(step);
        let (loss, grad_norm) = engine.train_step(step, lr)?;
        let secs = t0.elapsed().as_secs_f64();
        last_loss = loss;
        state.step = step + 1;
        state.samples_seen += cfg.global_batch;
        state.tokens_seen += tokens_per_step;
        state.optimizer_steps = engine.opt.steps();
        state.last_loss = Some(loss);
        let tps = tokens_per_step as f64 / secs;
        let mfu = engine.flops_per_token * tps / 1e9 / engine.peak_gflops;
        log.write(&json!({
            "event": "step", "step": state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "tokens": state.tokens_seen, "step_ms": secs * 1e3, "tokens_per_s": tps, "mfu": mfu,
            "world_size": 1, "generation": 0,
        }))?;
        bar.set_position(state.step);
        bar.set_message(format!(
            "loss {loss:.4} | {tps:.0} tok/s | mfu {:.0}%",
            100.0 * mfu
        ));
        if bar.is_hidden() && (state.step % 10 == 0 || state.step == cfg.steps) {
            eprintln!(
                "step {:>6}/{}  loss {loss:.4}  lr {lr:.2e}  {tps:.0} tok/s",
                state.step, cfg.steps
            );
        }

        let last = state.step == cfg.steps;
        if last || (cfg.eval_interval > 0 && state.step % cfg.eval_interval == 0) {
            let report = engine.evaluate()?;
            log.write(&report.record(state.step))?;
            bar.suspend(|| println!("{}", report.summary(state.step)));
            last_val = Some(report.loss);
        }
        if last || (cfg.checkpoint_interval > 0 && state.step % cfg.checkpoint_interval == 0) {
            let dir = engine.save_checkpoint(run_dir, &state)?;
            checkpoint::prune(run_dir, cfg.keep_checkpoints)?;
            log.write(&json!({"event": "checkpoint", "step": state.step, "path": dir}))?;
            last_ckpt = Some(dir);
        }
    }
    bar.finish_and_clear();
    let trained = (cfg.steps - first_step) * tokens_per_step;
    Ok(RunSummary {
        steps: cfg.steps,
        first_val_loss: first_val,
        last_val_loss: last_val,
        last_loss,
        tokens_per_s: trained as f64 / run_start.elapsed().as_secs_f64().max(1e-9),
        last_checkpoint: last_ckpt,
    })
}

/// The checkpoint `--resume` goes on from.
struct ResumePoint {
    dir: PathBuf,
    state: TrainerState,
    /// Newer checkpoints that did not verify.
    passed_over: usize,
}

/// The newest checkpoint of `run_dir` that verifies. Each newer one that does not is named
/// with why, and set aside: left in place it would still be the newest, and pruning would keep
/// it over the ones this run writes. `None` without checkpoints; an error naming each when
/// none verifies, with nothing moved.
fn resume_point(run_dir: &Path) -> Result<Option<ResumePoint>> {
    let (found, skipped) = checkpoint::newest_verified(run_dir, None)?;
    let Some((_, dir)) = found else {
        if skipped.is_empty() {
            return Ok(None);
        }
        let each: Vec<String> = skipped
            .iter()
            .map(|u| {
                let name = u.dir.file_name().unwrap_or_default().to_string_lossy();
                format!("{name}: {}", u.why)
            })
            .collect();
        return Err(EngineError::file(
            run_dir.join(ferry_spec::run_dir::CHECKPOINTS_DIR),
            format!(
                "no checkpoint verifies, nothing to resume from: {}",
                each.join("; ")
            ),
        ));
    };
    for u in &skipped {
        let to = checkpoint::set_aside(&u.dir)?;
        eprintln!(
            "resume: {} does not verify: {}; set aside as {}",
            u.dir.display(),
            u.why,
            to.display()
        );
    }
    // Verified just now: its checksum covers this file.
    let state = checkpoint::read_state(&dir)?;
    Ok(Some(ResumePoint {
        dir,
        state,
        passed_over: skipped.len(),
    }))
}

/// Reads the configuration a run directory was started with.
pub fn load_run_config(run_dir: &Path) -> Result<TrainConfig> {
    read_json(&run_dir.join(TRAIN_CONFIG_FILE))
}

/// A step counter on stderr (hidden when `enabled` is false), starting at step `at`.
pub(crate) fn progress_bar(enabled: bool, total: u64, at: u64) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    bar.set_position(at);
    bar
}

impl Engine {
    pub fn new(cfg: &TrainConfig) -> Result<Self> {
        runtime::keep_freed_memory();
        runtime::configure_threads(cfg.threads);
        let device = runtime::select_device(&cfg.device)?;
        let precision = runtime::precision_for(device)?;

        let train = TokenSplit::open(&cfg.data, "train", true)?;
        let val = TokenSplit::open(&cfg.data, "val", true)?;
        let manifest = train.manifest().clone();
        let tokenizer_path = cfg.data.join(&manifest.tokenizer_file);
        // Checkpoints carry the tokenizer; fail now, not at the first checkpoint.
        let tokenizer = ferry_dataset::tokenizer::load_tokenizer(&tokenizer_path)?;
        let mut mc = cfg.model_config(manifest.vocab_size as i64)?;
        // An override below the data's vocabulary leaves ids without an embedding row, which
        // libtorch finds only mid-step (a larger one pads the table, as GPT-2's 50304 does).
        let ids = (ferry_dataset::tokenizer::token_id_count(&tokenizer) as i64)
            .max(manifest.vocab_size as i64);
        if mc.vocab_size() < ids {
            return Err(EngineError::Config {
                field: "vocab_size".into(),
                message: format!(
                    "{} is smaller than the {ids} token ids of the data's tokenizer {}: every id needs a row",
                    mc.vocab_size(),
                    tokenizer_path.display()
                ),
            });
        }
        let family = mc.family();
        let seq_len = cfg.seq_len.unwrap_or(mc.context());
        let objective = if family == Family::Bert {
            let special = SpecialIds::from_tokenizer(&tokenizer, &tokenizer_path)?;
            mc.set_special_tokens(
                i64::from(manifest.eos_token_id),
                Some(i64::from(special.pad)),
            );
            let pairs = |split| {
                PairBuilder::new(
                    split,
                    seq_len as usize,
                    cfg.seed,
                    MaskingRule::default(),
                    special,
                )
            };
            // The held-out split must hold examples too; one builder serves both.
            pairs(&val)?;
            Objective::MaskedLm(pairs(&train)?)
        } else {
            mc.set_special_tokens(i64::from(manifest.eos_token_id), None);
            Objective::CausalLm
        };
        let num_sequences = train.num_sequences(seq_len as usize);
        if num_sequences == 0 || val.num_sequences(seq_len as usize) == 0 {
            return Err(EngineError::file(
                &cfg.data,
                format!("too few tokens for one sequence of {seq_len} in train or val"),
            ));
        }

        tch::manual_seed(mix_seed(&[cfg.seed, 0x1417]) as i64 & i64::MAX);
        let mut ps = ParamStore::new(device);
        let model = Model::new(&mut ps, &mc)?;
        if let Some(source) = &cfg.init_from {
            let from = load_initial_weights(source, &ps, &mc, &cfg.data, &manifest)?;
            eprintln!("initialised from {}", from.display());
        }
        let flops_per_token = mc.flops_per_token(seq_len, model.non_embedding_params(&ps));
        let opt = AdamW::new(
            &ps,
            AdamWConfig {
                beta1: cfg.beta1,
                beta2: cfg.beta2,
                eps: cfg.eps,
                weight_decay: cfg.weight_decay,
            },
        );
        let schedule = LrSchedule {
            peak: cfg.lr,
            min: cfg.min_lr,
            warmup_steps: cfg.warmup_steps,
            total_steps: cfg.steps,
            decay: cfg.decay,
        };
        Ok(Engine {
            cfg: cfg.clone(),
            device,
            seq_len,
            order: SampleOrder::new(cfg.seed, num_sequences),
            ps,
            model,
            model_config: mc,
            objective,
            opt,
            schedule,
            data: Data {
                train,
                val,
                tokenizer_path,
            },
            flops_per_token,
            peak_gflops: runtime::matmul_gflops(device),
            precision,
            trained_log: None,
        })
    }

    /// Training sequences of the corpus this engine reads (what the sample order permutes).
    pub fn num_sequences(&self) -> u64 {
        self.order.num_sequences()
    }

    /// One optimizer step over the global batch; returns (mean token loss, gradient norm).
    fn train_step(&mut self, step: u64, lr: f64) -> Result<(f64, f64)> {
        let sequences = self.order.step_sequences(step, self.cfg.global_batch);
        let loss = self.forward_backward(step, 0, &sequences)?;
        let grad_norm = self.apply_update(step, lr, loss)?;
        Ok((loss, grad_norm))
    }

    /// Forward and backward over `sequences`, a run of whole micro-batches of step `step`
    /// starting at micro-batch `first_micro`. Losses are divided by the counts of the whole
    /// global step (see [`crate::objective`]), so gradients (and the returned loss) summed
    /// over all the step's micro-batches, in one process or many, are the step's mean.
    pub fn forward_backward(
        &mut self,
        step: u64,
        first_micro: u64,
        sequences: &[u64],
    ) -> Result<f64> {
        self.forward_backward_hooked(step, first_micro, sequences, &mut || {})
    }

    /// [`forward_backward`](Self::forward_backward), calling `before_last_backward` just
    /// before the last micro-batch's backward, after which every gradient is final: data
    /// parallelism arms its gradient hooks there (`ferry_dp::overlap`).
    pub fn forward_backward_hooked(
        &mut self,
        step: u64,
        first_micro: u64,
        sequences: &[u64],
        before_last_backward: &mut dyn FnMut(),
    ) -> Result<f64> {
        let (micro, global) = (self.cfg.micro_batch as usize, self.cfg.global_batch);
        let seq_len = self.seq_len as usize;
        let step_ids = self.order.step_sequences(step, global);
        // The plan must be this step's own run of micro-batches: the counts below (and the
        // data every rank trains) rest on the coordinator and this process agreeing.
        let from = first_micro as usize * micro;
        if step_ids.get(from..from + sequences.len()) != Some(sequences) {
            return Err(EngineError::Config {
                field: "seed".into(),
                message: format!(
                    "step {step}: the planned sequences are not micro-batches {first_micro}.. of \
                     this process's sample order (different seed or data?)"
                ),
            });
        }
        let counts = self
            .objective
            .step_counts(&self.data.train, &step_ids, seq_len)?;
        let mut loss_sum = 0.0;
        let last = sequences.len().div_ceil(micro).saturating_sub(1);
        // What was fed through the model, micro-batch by micro-batch, when it is recorded.
        let mut fed: Vec<Vec<u64>> = Vec::new();
        for (k, chunk) in sequences.chunks(micro).enumerate() {
            // Dropout masks depend on the micro-batch's place in the global step, not on
            // which process runs it.
            let m = first_micro + k as u64;
            tch::manual_seed(mix_seed(&[self.cfg.seed, step, m]) as i64 & i64::MAX);
            let loss = self.objective.micro_batch_loss(
                &self.model,
                &self.data.train,
                chunk,
                seq_len,
                counts,
                self.precision,
                self.device,
            )?;
            loss_sum += loss.double_value(&[]);
            if let Some(log) = &mut self.trained_log {
                fed.push(chunk.to_vec());
                // This rank's gradients leave the process from the last backward on (the
                // overlapped all-reduce's hooks fire during it), so the record comes first.
                if k == last {
                    log.record(step, first_micro, &fed)?;
                }
            }
            if k == last {
                before_last_backward();
            }
            loss.backward();
        }
        if sequences.is_empty() {
            if let Some(log) = &mut self.trained_log {
                log.record(step, first_micro, &fed)?;
            }
        }
        Ok(loss_sum)
    }

    /// Clips the accumulated gradients, takes the optimizer step and clears the gradients;
    /// returns the gradient norm. `loss` is the step's loss, checked for divergence.
    pub fn apply_update(&mut self, step: u64, lr: f64, loss: f64) -> Result<f64> {
        let grad_norm = clip_grad_norm(&self.ps, self.cfg.grad_clip);
        self.opt.step(lr);
        self.ps.zero_grad();
        if !loss.is_finite() {
            return Err(EngineError::Config {
                field: "lr".into(),
                message: format!(
                    "loss became {loss} at step {}: lower the learning rate",
                    step + 1
                ),
            });
        }
        Ok(grad_norm)
    }

    /// Held-out metrics over the first `eval_sequences` sequences of the val split.
    pub fn evaluate(&self) -> Result<EvalReport> {
        let val = &self.data.val;
        let n = val
            .num_sequences(self.seq_len as usize)
            .min(self.cfg.eval_sequences.max(1));
        self.objective.evaluate(
            &self.model,
            val,
            n,
            self.cfg.micro_batch as usize,
            self.seq_len as usize,
            self.precision,
            self.device,
        )
    }

    pub fn save_checkpoint(&self, run_dir: &Path, state: &TrainerState) -> Result<PathBuf> {
        checkpoint::save(run_dir, state.step, |dir| {
            weights::save_safetensors(&dir.join(checkpoint::MODEL_FILE), self.ps.named())?;
            write_json(
                &dir.join(checkpoint::CONFIG_FILE),
                &self.model_config.to_hf_json(),
            )?;
            let tok = &self.data.tokenizer_path;
            std::fs::copy(tok, dir.join(checkpoint::TOKENIZER_FILE))
                .map_err(|e| EngineError::io(tok, e))?;
            weights::save_safetensors(
                &dir.join(checkpoint::OPTIMIZER_FILE),
                &self.opt.state_tensors(),
            )?;
            write_json(&dir.join(checkpoint::STATE_FILE), state)
        })
    }

    /// Loads checkpoint `dir`, already verified ([`checkpoint::verify_checkpoint`]), whose
    /// trainer state is `state`.
    pub fn load_checkpoint(&mut self, dir: &Path, state: TrainerState) -> Result<TrainerState> {
        checkpoint::load(
            dir,
            state,
            &self.ps,
            &mut self.opt,
            self.cfg.seed,
            self.model_config.family().base_prefix(),
        )
    }
}
