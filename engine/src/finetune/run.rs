//! `ferry finetune`: a pretrained checkpoint (or the same architecture from scratch) trained
//! on a labelled CSV, evaluated on dev as it goes and on test at the end. Read it top to
//! bottom in [`run`]: data and split, model, the epochs, the report.

use super::checks::{check, check_output};
use super::classifier::{Classifier, Pooling, TextBatch};
use super::encode::TextEncoder;
use super::saved::{self, FinetuneInfo};
use crate::checkpoint::{MODEL_FILE, TOKENIZER_FILE};
use crate::error::{EngineError, Result};
use crate::fsutil::{write_atomic, write_json};
use crate::models::{ModelConfig, ParamStore};
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::pretrained::{load_tokenizer_for, open_model_dir};
use crate::{runtime, weights};
use ferry_dataset::textcls::recipe::{
    discriminative_lrs, lowest_trainable_group, warmup_linear_decay,
};
use ferry_dataset::textcls::{
    read_labelled_csv_encoded, render_report_svg, CsvEncoding, EarlyStopping, LabelledSet, Metrics,
    NamedConfusion, Part, ReportSeries, SlantedTriangular, Split, SplitFractions, Verdict,
};
use ferry_spec::sampler::{mix_seed, shuffle};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// The learning-rate schedule's shape over the run.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// BERT: linear warmup over `warmup_frac` of the steps, then linear decay to 0.
    WarmupLinear,
    /// ULMFiT's slanted triangular learning rates (`cut_frac`, `ratio`).
    Stlr,
    Constant,
}

/// Where the weights come from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum Source {
    /// A pretraining checkpoint, a run directory (its newest checkpoint), or a `transformers`
    /// model directory of a supported family.
    Pretrained(PathBuf),
    /// Fresh weights for the architecture and tokenizer of this model directory: the
    /// no-transfer baseline.
    ScratchLike(PathBuf),
}

/// Everything that defines a fine-tuning run; saved in the report.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct FinetuneConfig {
    pub source: Source,
    pub data: PathBuf,
    /// The encoding of `data` (a spreadsheet's export is often Windows-1252). Defaults when
    /// absent, so reports written before it existed still read.
    #[serde(default)]
    pub encoding: CsvEncoding,
    pub text_column: String,
    pub label_column: String,
    pub output: PathBuf,
    /// Replace what an earlier run left in `output` (as `overwrite_output_dir` in
    /// `transformers`); without it a directory that holds anything is refused.
    #[serde(default)]
    pub overwrite: bool,
    /// Reuse this split instead of making one.
    pub split_file: Option<PathBuf>,
    /// Train on a stratified, seeded subset of this many training texts (a learning curve);
    /// dev and test stay whole.
    pub train_examples: Option<usize>,
    pub split_seed: u64,
    pub fractions: SplitFractions,
    pub epochs: u64,
    /// Stop after this many optimizer steps (0 = the epochs decide).
    pub max_steps: u64,
    pub batch_size: usize,
    /// Peak learning rate of the top layer group.
    pub lr: f64,
    pub weight_decay: f64,
    pub schedule: Schedule,
    pub warmup_frac: f64,
    pub cut_frac: f64,
    pub ratio: f64,
    /// Discriminative fine-tuning: each layer group below the top gets the rate of the group
    /// above divided by this (ULMFiT: 2.6; 1 = one rate for all).
    pub layer_lr_decay: f64,
    /// Gradual unfreezing: start with the top group only and thaw one more group every
    /// `unfreeze_every` steps (0 = everything trains from the start).
    pub unfreeze_every: u64,
    pub pooling: Option<Pooling>,
    /// Dropout before the classification head.
    pub dropout: f64,
    pub max_len: usize,
    /// Dev evaluations every this many steps (0 = at the end of each epoch).
    pub eval_every: u64,
    /// Stop after this many dev evaluations without a better macro-F1 (0 = never).
    pub patience: usize,
    pub grad_clip: f64,
    pub seed: u64,
    pub threads: usize,
    pub device: String,
}

/// What a finished run reports.
#[derive(Serialize, Debug)]
pub struct FinetuneReport {
    pub config: FinetuneConfig,
    pub family: String,
    pub parameters: i64,
    pub steps: u64,
    /// The step whose weights were kept (best dev macro-F1).
    pub best_step: u64,
    pub seconds: f64,
    pub split: SplitSizes,
    pub dev: Metrics,
    pub test: Metrics,
    pub curves: Curves,
}

#[derive(Serialize, Debug)]
pub struct SplitSizes {
    pub file: PathBuf,
    pub train: usize,
    pub dev: usize,
    pub test: usize,
}

#[derive(Serialize, Debug, Default)]
pub struct Curves {
    pub train_loss: Vec<(u64, f64)>,
    pub dev_accuracy: Vec<(u64, f64)>,
    pub dev_macro_f1: Vec<(u64, f64)>,
}

pub const REPORT_JSON: &str = "report.json";
pub const REPORT_SVG: &str = "report.svg";
pub const SPLIT_FILE: &str = "split.json";
pub const MODEL_DIR: &str = "model";

/// Where a run starts from: the model's config and tokenizer, and weights unless scratch.
struct Start {
    config: ModelConfig,
    tokenizer: PathBuf,
    weights: Option<PathBuf>,
    name: String,
}

/// Opens the source model directory; refuses one whose tokenizer has ids past its vocabulary
/// or whose positions are fewer than `max_len` (texts that long would index past the table).
fn open_source(source: &Source, max_len: usize) -> Result<Start> {
    let (dir, pretrained) = match source {
        Source::Pretrained(d) => (d, true),
        Source::ScratchLike(d) => (d, false),
    };
    let (dir, config) = open_model_dir(dir)?;
    let tokenizer = dir.join(TOKENIZER_FILE);
    if !tokenizer.is_file() {
        return Err(EngineError::file(
            &tokenizer,
            "missing: fine-tuning needs the model's tokenizer.json",
        ));
    }
    load_tokenizer_for(&dir, &config)?;
    if max_len as i64 > config.context() {
        return Err(EngineError::Config {
            field: "max_len".into(),
            message: format!(
                "--max-len {max_len} is longer than the model's {} ({}) in {}; use at most {}",
                config.context_field(),
                config.context(),
                dir.join(crate::checkpoint::CONFIG_FILE).display(),
                config.context()
            ),
        });
    }
    Ok(Start {
        config,
        tokenizer,
        weights: pretrained.then(|| dir.join(MODEL_FILE)),
        name: if pretrained {
            dir.display().to_string()
        } else {
            format!("scratch (architecture of {})", dir.display())
        },
    })
}

/// Encoded texts and gold labels of one part of the split.
struct PartData {
    ids: Vec<Vec<i64>>,
    labels: Vec<usize>,
}

fn encode_part(
    set: &LabelledSet,
    split: &Split,
    part: Part,
    enc: &TextEncoder,
) -> Result<PartData> {
    let mut data = PartData {
        ids: Vec::new(),
        labels: Vec::new(),
    };
    for e in split.examples(part, set) {
        data.ids.push(enc.encode(&e.text)?);
        data.labels.push(e.label.expect("a labelled set"));
    }
    Ok(data)
}

pub fn run(cfg: &FinetuneConfig, progress: bool) -> Result<FinetuneReport> {
    let started = Instant::now();
    runtime::keep_freed_memory();
    runtime::configure_threads(cfg.threads);
    let device = runtime::select_device(&cfg.device)?;
    check(cfg)?;
    // The model first: one that cannot start the run is refused before the output is made.
    let start = open_source(&cfg.source, cfg.max_len)?;
    check_output(&cfg.output, cfg.overwrite)?;
    std::fs::create_dir_all(&cfg.output).map_err(|e| EngineError::io(&cfg.output, e))?;

    // Data: the CSV by header names, and a stratified split kept next to the report.
    let set = read_labelled_csv_encoded(
        &cfg.data,
        &cfg.text_column,
        Some(&cfg.label_column),
        None,
        cfg.encoding,
    )?;
    let split = match &cfg.split_file {
        Some(path) => Split::load(path, &set)?,
        None => Split::stratified(&set, cfg.fractions, cfg.split_seed)?,
    };
    let split_path = cfg.output.join(SPLIT_FILE);
    split.save(&split_path)?;
    eprintln!(
        "{}: {} texts, labels {}; split train {} / dev {} / test {} (seed {})",
        cfg.data.display(),
        set.len(),
        set.counts()
            .map(|(l, n)| format!("{l} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        split.indices(Part::Train).len(),
        split.indices(Part::Dev).len(),
        split.indices(Part::Test).len(),
        split.seed
    );

    // Model: the body from the source (or fresh), a fresh head.
    let family = start.config.family();
    let pooling = cfg.pooling.unwrap_or(Pooling::default_for(family));
    tch::manual_seed(mix_seed(&[cfg.seed, 0xF17E]) as i64 & i64::MAX);
    let mut ps = ParamStore::new(device);
    let labels = set.labels.clone();
    let model = Classifier::new(
        &mut ps,
        &start.config,
        labels.len() as i64,
        pooling,
        cfg.dropout,
    )?;
    if let Some(path) = &start.weights {
        let fresh = weights::load_except(
            &ps,
            &weights::load_safetensors(path)?,
            family.base_prefix(),
            path,
            |name| name.starts_with("classifier.") || name.starts_with("score."),
        )?;
        eprintln!("loaded {}; new: {}", path.display(), fresh.join(", "));
    }
    let tokenizer = ferry_dataset::tokenizer::load_tokenizer(&start.tokenizer)?;
    let enc = TextEncoder::new(
        tokenizer,
        &start.tokenizer,
        family,
        cfg.max_len,
        start.config.eos_token_id(),
    )?;
    let mut train = encode_part(&set, &split, Part::Train, &enc)?;
    if let Some(n) = cfg.train_examples {
        train = stratified_subset(train, n, set.labels.len(), cfg.seed);
    }
    let dev = encode_part(&set, &split, Part::Dev, &enc)?;
    let test = encode_part(&set, &split, Part::Test, &enc)?;

    // Optimisation: one AdamW per layer group, created when the group thaws.
    let (group_of, num_groups) = model.layer_groups(&ps);
    let group_lrs = discriminative_lrs(cfg.lr, num_groups, cfg.layer_lr_decay);
    let adam = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: cfg.weight_decay,
    };
    let mut groups: Vec<Option<AdamW>> = (0..num_groups).map(|_| None).collect();
    let batches_per_epoch = train.ids.len().div_ceil(cfg.batch_size) as u64;
    let mut total_steps = cfg.epochs * batches_per_epoch;
    if cfg.max_steps > 0 {
        total_steps = total_steps.min(cfg.max_steps);
    }
    let stlr = SlantedTriangular::new(cfg.cut_frac, cfg.ratio)?;
    let warmup = (cfg.warmup_frac * total_steps as f64).round() as u64;
    let multiplier = |t: u64| match cfg.schedule {
        Schedule::WarmupLinear => warmup_linear_decay(t, warmup, total_steps),
        Schedule::Stlr => stlr.multiplier(t, total_steps),
        Schedule::Constant => 1.0,
    };
    let eval_every = if cfg.eval_every > 0 {
        cfg.eval_every
    } else {
        batches_per_epoch
    };
    eprintln!(
        "{} {} with {pooling:?} pooling, {} parameters in {num_groups} layer groups; \
         {total_steps} steps of {} texts, dev every {eval_every} steps",
        family.name(),
        if start.weights.is_some() {
            "pretrained"
        } else {
            "from scratch"
        },
        ps.num_elements(),
        cfg.batch_size,
    );

    let mut curves = Curves::default();
    let mut stopping = EarlyStopping::new(cfg.patience, 0.0);
    // The best dev evaluation: its step, its weights and its metrics.
    let mut best: Option<(u64, Vec<Tensor>, Metrics)> = None;
    let bar = crate::train::progress_bar(progress, total_steps, 0);
    let mut step = 0u64;
    let mut order: Vec<usize> = (0..train.ids.len()).collect();
    'epochs: for epoch in 0.. {
        shuffle(&mut order, mix_seed(&[cfg.seed, 0x5EED_EC0C, epoch]));
        for chunk in order.chunks(cfg.batch_size) {
            if step >= total_steps {
                break 'epochs;
            }
            thaw(cfg, step, &ps, &group_of, &mut groups, adam);
            tch::manual_seed(mix_seed(&[cfg.seed, step]) as i64 & i64::MAX);
            let rows: Vec<Vec<i64>> = chunk.iter().map(|&i| train.ids[i].clone()).collect();
            let gold: Vec<i64> = chunk.iter().map(|&i| train.labels[i] as i64).collect();
            let batch = TextBatch::new(&rows, enc.pad_id(), device);
            let logits = model.logits(&batch, true).to_kind(Kind::Float);
            let loss =
                logits.cross_entropy_for_logits(&Tensor::from_slice(&gold).to_device(device));
            loss.backward();
            clip_grad_norm(&ps, cfg.grad_clip);
            let m = multiplier(step);
            for (g, opt) in groups.iter_mut().enumerate() {
                if let Some(opt) = opt {
                    opt.step(group_lrs[g] * m);
                }
            }
            ps.zero_grad();
            let loss = loss.double_value(&[]);
            if !loss.is_finite() {
                return Err(EngineError::Config {
                    field: "lr".into(),
                    message: format!("the loss became {loss} at step {}: lower it", step + 1),
                });
            }
            step += 1;
            curves.train_loss.push((step, loss));
            bar.set_position(step);
            bar.set_message(format!("epoch {} loss {loss:.4}", epoch + 1));
            if step % eval_every == 0 || step == total_steps {
                let metrics =
                    evaluate(&model, &dev, &labels, cfg.batch_size, enc.pad_id(), device)?;
                curves.dev_accuracy.push((step, metrics.accuracy));
                curves.dev_macro_f1.push((step, metrics.macro_f1));
                let verdict = stopping.observe(step, metrics.macro_f1);
                bar.suspend(|| {
                    eprintln!(
                        "step {step:>6}  epoch {}  loss {loss:.4}  dev accuracy {:.4}  macro-F1 {:.4}{}",
                        epoch + 1,
                        metrics.accuracy,
                        metrics.macro_f1,
                        if verdict == Verdict::Improved { "  (best)" } else { "" }
                    )
                });
                if verdict == Verdict::Improved {
                    best = Some((step, snapshot(&ps), metrics));
                }
                if cfg.patience > 0 && verdict == Verdict::Stop {
                    eprintln!(
                        "early stop: no better dev macro-F1 in {} evaluations",
                        cfg.patience
                    );
                    break 'epochs;
                }
            }
        }
    }
    bar.finish_and_clear();

    // The kept model: the best dev evaluation's weights, scored on dev and test. Its dev
    // metrics are those measured when it was kept (evaluation is deterministic), so dev is
    // not evaluated again.
    let (best_step, dev_metrics) = match best {
        Some((s, weights, metrics)) => {
            restore(&ps, &weights);
            (s, metrics)
        }
        None => (
            step,
            evaluate(&model, &dev, &labels, cfg.batch_size, enc.pad_id(), device)?,
        ),
    };
    let test_metrics = evaluate(&model, &test, &labels, cfg.batch_size, enc.pad_id(), device)?;
    let info = FinetuneInfo {
        labels: labels.clone(),
        max_len: cfg.max_len,
        pooling,
        text_column: cfg.text_column.clone(),
        label_column: cfg.label_column.clone(),
        from: start.name.clone(),
    };
    saved::save(
        &cfg.output.join(MODEL_DIR),
        &ps,
        &model,
        &enc,
        &info,
        &start.tokenizer,
    )?;
    let report = FinetuneReport {
        config: cfg.clone(),
        family: family.name().into(),
        parameters: ps.num_elements(),
        steps: step,
        best_step,
        seconds: started.elapsed().as_secs_f64(),
        split: SplitSizes {
            file: split_path,
            train: train.ids.len(),
            dev: dev.ids.len(),
            test: test.ids.len(),
        },
        dev: dev_metrics,
        test: test_metrics,
        curves,
    };
    write_report(&cfg.output, &report, &start.name)?;
    Ok(report)
}

/// `n` of the texts, each class keeping its share (largest remainder), chosen by a seeded
/// shuffle; the rest is dropped.
fn stratified_subset(part: PartData, n: usize, num_labels: usize, seed: u64) -> PartData {
    let total = part.labels.len();
    if n >= total {
        return part;
    }
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); num_labels];
    for (i, &l) in part.labels.iter().enumerate() {
        by_class[l].push(i);
    }
    let exact: Vec<f64> = by_class
        .iter()
        .map(|c| c.len() as f64 * n as f64 / total as f64)
        .collect();
    let mut take: Vec<usize> = exact.iter().map(|x| x.floor() as usize).collect();
    let mut order: Vec<usize> = (0..num_labels).collect();
    order.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())));
    for &c in order.iter().cycle().take(n - take.iter().sum::<usize>()) {
        take[c] += 1;
    }
    let mut kept = Vec::with_capacity(n);
    for (c, members) in by_class.iter_mut().enumerate() {
        shuffle(members, mix_seed(&[seed, 0x5B5E7, c as u64]));
        kept.extend_from_slice(&members[..take[c].min(members.len())]);
    }
    kept.sort_unstable();
    PartData {
        ids: kept.iter().map(|&i| part.ids[i].clone()).collect(),
        labels: kept.iter().map(|&i| part.labels[i]).collect(),
    }
}

/// Gradual unfreezing: which groups train at `step`. A group thaws with a fresh optimizer
/// (its own step count, so Adam's bias correction starts from its first update); frozen
/// parameters compute no gradients.
fn thaw(
    cfg: &FinetuneConfig,
    step: u64,
    ps: &ParamStore,
    group_of: &[usize],
    groups: &mut [Option<AdamW>],
    adam: AdamWConfig,
) {
    let lowest = if cfg.unfreeze_every == 0 {
        0
    } else {
        lowest_trainable_group(groups.len(), (step / cfg.unfreeze_every) as usize)
    };
    for (g, slot) in groups.iter_mut().enumerate() {
        let trains = g >= lowest;
        if trains && slot.is_none() {
            let params: Vec<(String, Tensor)> = ps
                .named()
                .iter()
                .zip(group_of)
                .filter(|(_, &pg)| pg == g)
                .map(|((n, t), _)| (n.clone(), t.shallow_clone()))
                .collect();
            *slot = Some(AdamW::for_params(&params, adam));
        }
        for ((_, p), &pg) in ps.named().iter().zip(group_of) {
            if pg == g {
                let _ = p.shallow_clone().set_requires_grad(trains);
            }
        }
    }
}

/// Label probabilities [texts, labels] for encoded texts, in batches of texts of similar
/// length (each text's result does not depend on its batch, and sorted batches carry far
/// less padding), returned in the order of `ids`.
pub(crate) fn predict_ids(
    model: &Classifier,
    ids: &[Vec<i64>],
    batch_size: usize,
    pad: i64,
    device: Device,
) -> Result<Tensor> {
    if ids.is_empty() {
        return Ok(Tensor::zeros(
            [0, model.num_labels],
            (Kind::Float, Device::Cpu),
        ));
    }
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| ids[i].len());
    let mut probs = Vec::new();
    tch::no_grad(|| {
        for chunk in order.chunks(batch_size.max(1)) {
            let rows: Vec<Vec<i64>> = chunk.iter().map(|&i| ids[i].clone()).collect();
            let batch = TextBatch::new(&rows, pad, device);
            probs.push(
                model
                    .logits(&batch, false)
                    .to_kind(Kind::Float)
                    .softmax(-1, Kind::Float)
                    .to_device(Device::Cpu),
            );
        }
    });
    // Row r of the sorted result belongs to text order[r].
    let mut place = vec![0i64; ids.len()];
    for (r, &i) in order.iter().enumerate() {
        place[i] = r as i64;
    }
    Ok(Tensor::cat(&probs, 0).index_select(0, &Tensor::from_slice(&place)))
}

fn evaluate(
    model: &Classifier,
    part: &PartData,
    labels: &[String],
    batch_size: usize,
    pad: i64,
    device: Device,
) -> Result<Metrics> {
    let probs = predict_ids(model, &part.ids, batch_size, pad, device)?;
    let predicted: Vec<usize> = Vec::<i64>::try_from(&probs.argmax(-1, false))?
        .into_iter()
        .map(|p| p as usize)
        .collect();
    Metrics::from_predictions(&part.labels, &predicted, labels).map_err(|e| EngineError::Config {
        field: "labels".into(),
        message: e.to_string(),
    })
}

fn snapshot(ps: &ParamStore) -> Vec<Tensor> {
    tch::no_grad(|| ps.named().iter().map(|(_, p)| p.detach().copy()).collect())
}

fn restore(ps: &ParamStore, saved: &[Tensor]) {
    tch::no_grad(|| {
        for ((_, p), s) in ps.named().iter().zip(saved) {
            let _ = p.shallow_clone().copy_(s);
        }
    });
}

/// `report.json`, `report.svg` and the tables on stdout.
fn write_report(dir: &Path, report: &FinetuneReport, from: &str) -> Result<()> {
    write_json(&dir.join(REPORT_JSON), report)?;
    let svg = render_report_svg(&ReportSeries {
        title: format!("{} fine-tuned from {from}", report.family),
        labels: report.dev.labels.clone(),
        confusions: vec![
            NamedConfusion {
                name: format!("dev ({} texts)", report.dev.total),
                counts: report.dev.confusion.clone(),
            },
            NamedConfusion {
                name: format!("test ({} texts)", report.test.total),
                counts: report.test.confusion.clone(),
            },
        ],
        train_loss: report.curves.train_loss.clone(),
        dev_accuracy: report.curves.dev_accuracy.clone(),
        dev_macro_f1: report.curves.dev_macro_f1.clone(),
    });
    write_atomic(&dir.join(REPORT_SVG), svg.as_bytes())?;
    println!("dev (best step {} of {}):", report.best_step, report.steps);
    println!("{}", report.dev.render_table());
    println!("test:");
    println!("{}", report.test.render_table());
    println!(
        "{}",
        json!({
            "family": report.family, "from": from, "steps": report.steps,
            "dev_accuracy": report.dev.accuracy, "dev_macro_f1": report.dev.macro_f1,
            "test_accuracy": report.test.accuracy, "test_macro_f1": report.test.macro_f1,
            "seconds": report.seconds,
        })
    );
    Ok(())
}
