//! `ferry finetune` and `ferry predict`: their arguments, and the file I/O around the
//! fine-tuning loop ([`super::run`]) and prediction ([`super::predict`]).

use crate::finetune::classifier::Pooling;
use crate::finetune::predict::predict;
use crate::finetune::run::{self, FinetuneConfig, Schedule, Source};
use crate::finetune::saved;
use crate::{fsutil, runtime};
use anyhow::{bail, Result};
use clap::Args;
use ferry_dataset::textcls::{read_labelled_csv_encoded, CsvEncoding, Metrics, SplitFractions};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct FinetuneArgs {
    /// A pretrained checkpoint, a run directory (its newest checkpoint), a transformers model
    /// directory, or `scratch` (then --like gives the architecture and tokenizer).
    #[arg(long)]
    from: String,
    /// With `--from scratch`: the model directory whose architecture and tokenizer to use.
    #[arg(long)]
    like: Option<PathBuf>,
    /// The labelled CSV (header row; columns found by name).
    #[arg(long)]
    data: PathBuf,
    /// The encoding of --data: utf-8, latin-1 (iso-8859-1) or windows-1252 (cp1252), the usual
    /// one of a CSV saved by a spreadsheet on Windows.
    #[arg(long, value_enum, default_value = "utf-8", ignore_case = true)]
    encoding: CsvEncoding,
    #[arg(long, default_value = "text")]
    text_column: String,
    #[arg(long, default_value = "airline_sentiment")]
    label_column: String,
    /// Output directory: split.json, report.json, report.svg, model/.
    #[arg(long)]
    output: PathBuf,
    /// Replace the output of an earlier run in --output (refused without it whenever --output
    /// holds anything); other files there are kept.
    #[arg(long)]
    overwrite: bool,
    /// Reuse a split.json (from an earlier run) instead of making one.
    #[arg(long)]
    split: Option<PathBuf>,
    /// Train on a stratified subset of this many training texts (dev and test stay whole),
    /// e.g. for a learning curve.
    #[arg(long)]
    train_examples: Option<usize>,
    /// Seed of the stratified split.
    #[arg(long, default_value_t = 0)]
    split_seed: u64,
    /// train,dev,test shares of the stratified split.
    #[arg(
        long,
        default_value = "0.8,0.1,0.1",
        value_delimiter = ',',
        num_args = 3
    )]
    split_fractions: Vec<f64>,
    #[arg(long, default_value_t = 3)]
    epochs: u64,
    /// Stop after this many optimizer steps (0 = the epochs decide).
    #[arg(long, default_value_t = 0)]
    max_steps: u64,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Peak learning rate (of the top layer group).
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// warmup-linear (BERT), stlr (ULMFiT's slanted triangular) or constant.
    #[arg(long, value_enum, default_value = "warmup-linear")]
    schedule: Schedule,
    /// warmup-linear: share of the steps spent warming up.
    #[arg(long, default_value_t = 0.1)]
    warmup_frac: f64,
    /// stlr: share of the steps spent rising.
    #[arg(long, default_value_t = 0.1)]
    cut_frac: f64,
    /// stlr: how much smaller the lowest rate is than the peak.
    #[arg(long, default_value_t = 32.0)]
    ratio: f64,
    /// Discriminative learning rates: each lower layer group gets the rate above / this
    /// (ULMFiT: 2.6; 1 = one rate).
    #[arg(long, default_value_t = 1.0)]
    layer_lr_decay: f64,
    /// Gradual unfreezing: train the top group first and thaw one more every N steps
    /// (0 = all from the start).
    #[arg(long, default_value_t = 0)]
    unfreeze_every: u64,
    /// cls (BERT), last or concat (GPT, GPT-2) [default: the family's].
    #[arg(long, value_enum)]
    pooling: Option<Pooling>,
    /// Dropout before the classification head.
    #[arg(long, default_value_t = 0.1)]
    dropout: f64,
    /// Tokens per text (longer texts are cut).
    #[arg(long, default_value_t = 96)]
    max_len: usize,
    /// Dev evaluation every N steps (0 = each epoch's end).
    #[arg(long, default_value_t = 0)]
    eval_every: u64,
    /// Early stopping: dev evaluations without a better macro-F1 before stopping (0 = off).
    #[arg(long, default_value_t = 0)]
    patience: usize,
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// libtorch threads, 0 = one per core.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Hide the progress bar.
    #[arg(long)]
    no_progress: bool,
}

pub fn run_finetune(a: FinetuneArgs) -> Result<()> {
    let source = match (a.from.as_str(), a.like) {
        ("scratch", Some(like)) => Source::ScratchLike(like),
        ("scratch", None) => bail!(
            "--from scratch needs --like DIR: the model directory whose architecture and tokenizer to train from scratch"
        ),
        (_, Some(_)) => bail!("--like only goes with --from scratch"),
        (dir, None) => Source::Pretrained(PathBuf::from(dir)),
    };
    let [train, dev, test] = a.split_fractions[..] else {
        bail!("--split-fractions: give three shares, train,dev,test");
    };
    let cfg = FinetuneConfig {
        source,
        data: a.data,
        encoding: a.encoding,
        text_column: a.text_column,
        label_column: a.label_column,
        output: a.output,
        overwrite: a.overwrite,
        split_file: a.split,
        train_examples: a.train_examples,
        split_seed: a.split_seed,
        fractions: SplitFractions { train, dev, test },
        epochs: a.epochs,
        max_steps: a.max_steps,
        batch_size: a.batch_size,
        lr: a.lr,
        weight_decay: a.weight_decay,
        schedule: a.schedule,
        warmup_frac: a.warmup_frac,
        cut_frac: a.cut_frac,
        ratio: a.ratio,
        layer_lr_decay: a.layer_lr_decay,
        unfreeze_every: a.unfreeze_every,
        pooling: a.pooling,
        dropout: a.dropout,
        max_len: a.max_len,
        eval_every: a.eval_every,
        patience: a.patience,
        grad_clip: a.grad_clip,
        seed: a.seed,
        threads: a.threads,
        device: a.device,
    };
    let progress = !a.no_progress && std::io::stderr().is_terminal();
    let report = run::run(&cfg, progress)?;
    eprintln!(
        "wrote {}, {}, {} and {}",
        cfg.output.join(run::REPORT_JSON).display(),
        cfg.output.join(run::REPORT_SVG).display(),
        report.split.file.display(),
        cfg.output.join(run::MODEL_DIR).display()
    );
    Ok(())
}

#[derive(Args)]
pub struct PredictArgs {
    /// A fine-tuned model directory (`<finetune output>/model`, or its parent).
    #[arg(long)]
    model: PathBuf,
    /// Texts to classify.
    texts: Vec<String>,
    /// Classify every row of this CSV instead.
    #[arg(long, conflicts_with = "texts")]
    input: Option<PathBuf>,
    /// Where to write the predictions of --input as CSV [default: stdout]. Never the --input
    /// itself, and an existing file only with --overwrite.
    #[arg(long, requires = "input")]
    output: Option<PathBuf>,
    /// Replace an existing --output file.
    #[arg(long, requires = "output")]
    overwrite: bool,
    /// The text column of --input [default: the one the model was fine-tuned on].
    #[arg(long)]
    text_column: Option<String>,
    /// A label column of --input to score the predictions against.
    #[arg(long)]
    label_column: Option<String>,
    /// The encoding of --input: utf-8, latin-1 (iso-8859-1) or windows-1252 (cp1252). The
    /// predictions are written as UTF-8 whatever it is.
    #[arg(
        long,
        value_enum,
        default_value = "utf-8",
        ignore_case = true,
        requires = "input"
    )]
    encoding: CsvEncoding,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    #[arg(long, default_value = "auto")]
    device: String,
}

pub fn run_predict(a: PredictArgs) -> Result<()> {
    if let (Some(input), Some(output)) = (&a.input, &a.output) {
        check_predict_output(input, output, a.overwrite)?;
    }
    let device = runtime::select_device(&a.device)?;
    let dir = if a.model.join(run::MODEL_DIR).join("config.json").is_file() {
        a.model.join(run::MODEL_DIR)
    } else {
        a.model.clone()
    };
    let model = saved::load(&dir, device)?;
    let labels = model.info.labels.clone();
    let Some(input) = a.input else {
        if a.texts.is_empty() {
            bail!("give texts to classify, or --input FILE.csv");
        }
        let texts: Vec<&str> = a.texts.iter().map(String::as_str).collect();
        for (text, p) in texts.iter().zip(predict(&model, &texts, a.batch_size)?) {
            let probs: Vec<String> = labels
                .iter()
                .zip(&p.probabilities)
                .map(|(l, q)| format!("{l} {q:.3}"))
                .collect();
            println!("{}\t{}\t{text}", p.label, probs.join(" "));
        }
        return Ok(());
    };
    let text_column = a.text_column.unwrap_or(model.info.text_column.clone());
    let set = read_labelled_csv_encoded(
        &input,
        &text_column,
        a.label_column.as_deref(),
        Some(&labels),
        a.encoding,
    )?;
    let texts: Vec<&str> = set.examples.iter().map(|e| e.text.as_str()).collect();
    let predictions = predict(&model, &texts, a.batch_size)?;
    let mut out = String::new();
    let mut header = vec!["record".to_string(), "predicted".to_string()];
    header.extend(labels.iter().map(|l| format!("p_{l}")));
    header.push(text_column.clone());
    out.push_str(&csv_row(&header));
    for (e, p) in set.examples.iter().zip(&predictions) {
        let mut row = vec![e.record.to_string(), p.label.clone()];
        row.extend(p.probabilities.iter().map(|q| format!("{q:.6}")));
        row.push(e.text.clone());
        out.push_str(&csv_row(&row));
    }
    match &a.output {
        Some(path) => fsutil::write_atomic(path, out.as_bytes())?,
        None => std::io::stdout().write_all(out.as_bytes())?,
    }
    if let Some(gold) = set.label_indices().filter(|_| a.label_column.is_some()) {
        let predicted: Vec<usize> = predictions.iter().map(|p| p.index).collect();
        let metrics = Metrics::from_predictions(&gold, &predicted, &labels)?;
        eprintln!("{}", metrics.render_table());
    }
    if let Some(path) = &a.output {
        eprintln!(
            "{} predictions written to {}",
            predictions.len(),
            path.display()
        );
    }
    Ok(())
}

/// Checked before anything is read: the predictions never replace their own input (however
/// the path is spelled, or through a link), and an existing file only with `--overwrite`.
fn check_predict_output(input: &Path, output: &Path, overwrite: bool) -> Result<()> {
    if fsutil::same_file(input, output) {
        bail!(
            "{}: --output is the --input file {}; refusing to write over it, choose another --output",
            output.display(),
            input.display()
        );
    }
    if output.is_dir() {
        bail!("{}: --output is a directory; name a file", output.display());
    }
    if !overwrite && (output.exists() || output.is_symlink()) {
        bail!(
            "{}: exists; refusing to overwrite it: choose another --output, or pass --overwrite to replace it",
            output.display()
        );
    }
    Ok(())
}

/// One RFC 4180 row: every field quoted, quotes doubled.
fn csv_row(fields: &[String]) -> String {
    let quoted: Vec<String> = fields
        .iter()
        .map(|f| format!("\"{}\"", f.replace('"', "\"\"")))
        .collect();
    quoted.join(",") + "\r\n"
}
