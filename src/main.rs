//! `ferry`: the one binary. Each subcommand is a thin layer over the library crates.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use ferry_collective::bench::{run_allreduce_bench, AllReduceBenchConfig};
use ferry_collective::Transport;
use ferry_dataset::corpus::CsvTexts;
use ferry_dataset::prepare::{prepare, PrepareOptions};
use ferry_dataset::textcls::{CsvEncoding, Part};
use ferry_dataset::tokenizer::TokenizerKind;
use ferry_engine::bench::{run_train_bench, TrainBenchConfig};
use ferry_engine::generate::{continue_text, SamplingConfig};
use ferry_engine::models::parse_family;
use ferry_engine::runtime;
use std::io::IsTerminal;

mod cli_spec;
mod cluster;
mod examples;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "ferry",
    // The build id is the coordinator's (`ferry_coordinator::BUILD_ID`): scripts compare it
    // with `ferry-coordinator --version` before running the slim binary.
    version = ferry_coordinator::VERSION,
    about = "Data-parallel pretraining and fine-tuning of GPT, GPT-2 and BERT"
)]
#[command(args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download the public corpora (WikiText-103, Gutenberg books, airline tweets), checked
    /// against pinned digests, into the data directory.
    #[command(subcommand)]
    Data(DataCommand),
    /// Tokenize corpora (WikiText files, plain-text books, a labelled CSV's texts) into token shards.
    Prepare(PrepareArgs),
    /// Pretrain a model in this process.
    Train(ferry_engine::train::cli::TrainArgs),
    /// Sample text from a trained model (GPT-2 or GPT).
    Generate(GenerateArgs),
    /// Fine-tune a pretrained checkpoint (or the same architecture from scratch) on a labelled
    /// CSV: stratified split, dev evaluation, report (JSON, table, SVG), transformers-format model.
    Finetune(ferry_engine::finetune::cli::FinetuneArgs),
    /// Classify texts with a fine-tuned model.
    Predict(ferry_engine::finetune::cli::PredictArgs),
    /// Show the training examples a model family builds from prepared data (BERT's sentence
    /// pairs and masks, GPT windows), exactly as every worker builds them.
    Examples(ExamplesArgs),
    /// Serve a job's control plane: membership, rendezvous, sample schedule, durable state.
    Coordinator(cluster::CoordinatorArgs),
    /// Train as one data-parallel rank of a coordinator's job.
    Worker(cluster::WorkerArgs),
    /// Run a whole job on this machine: coordinator plus N worker processes.
    Launch(ferry_launch::LaunchArgs),
    /// Show a running job: phase, step, generation and a table of workers.
    Status(cluster::StatusArgs),
    /// Change the number of workers of a running job (at the next step boundary).
    Scale(cluster::ScaleArgs),
    /// Stop a running job after its current step.
    Stop(cluster::StopArgs),
    /// Every subcommand, flag and environment variable as JSON (for checking manifests).
    #[command(hide = true)]
    HelpJson,
    /// Throughput benchmarks (JSON lines on stdout).
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Args)]
struct PrepareArgs {
    /// Corpus files, directories or glob patterns (WikiText `.tokens`/`.raw`, plain-text books,
    /// and `.csv` files whose texts become one document per record).
    #[arg(long = "input", short, required = true, num_args = 1..)]
    inputs: Vec<String>,
    /// Output directory for shards, index, manifest and tokenizer.
    #[arg(long, short)]
    output: PathBuf,
    /// The model family the data is for; it picks the tokenizer: byte-level BPE for gpt2,
    /// BPE with `</w>` word ends for gpt, WordPiece for bert.
    #[arg(long, default_value = "gpt2", value_parser = ["gpt2", "gpt", "bert"])]
    model: String,
    /// Use this tokenizer.json instead of training a new one.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Vocabulary size of the trained tokenizer.
    #[arg(long, default_value_t = 8192)]
    vocab_size: usize,
    /// Share of documents held out for validation.
    #[arg(long, default_value_t = 0.02)]
    val_fraction: f64,
    /// Seeds the train/validation assignment.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Maximum tokens per shard file.
    #[arg(long, default_value_t = 16 << 20)]
    shard_tokens: u64,
    /// The column of `.csv` inputs that holds the text.
    #[arg(long, default_value = "text")]
    text_column: String,
    /// Keep only the `.csv` records of one part of this split.json (from `ferry finetune`), so
    /// that pretraining on a task's texts never sees its dev and test texts.
    #[arg(long)]
    split: Option<PathBuf>,
    /// The part of --split to keep.
    #[arg(long, default_value = "train", value_parser = ["train", "dev", "test"], requires = "split")]
    split_part: String,
    /// The encoding of `.csv` inputs: utf-8, latin-1 (iso-8859-1) or windows-1252 (cp1252),
    /// as given to `ferry finetune` for the same file. Other inputs are always UTF-8.
    #[arg(long, value_enum, default_value = "utf-8", ignore_case = true)]
    encoding: CsvEncoding,
    /// Hide progress bars.
    #[arg(long)]
    no_progress: bool,
}

#[derive(Args)]
struct GenerateArgs {
    /// A checkpoint directory, a run directory (newest checkpoint) or a transformers model dir.
    #[arg(long)]
    model: PathBuf,
    /// Text to continue.
    #[arg(long, default_value = "")]
    prompt: String,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Do not end before this many new tokens: the end-of-text token is not sampled until
    /// then (as `min_new_tokens` in transformers).
    #[arg(long, default_value_t = 0)]
    min_new_tokens: usize,
    /// Sampling temperature, finite and >= 0; 0 (or anything below 1e-4) = greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Sample among the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 50)]
    top_k: i64,
    /// Nucleus sampling: the smallest set of tokens with probability >= p, in (0, 1].
    #[arg(long, default_value_t = 0.95)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Download, check and unpack the corpora; resumable, and a no-op when they are in place.
    Fetch(ferry_fetch::cli::FetchArgs),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// GPT-2 training tokens/s on random tokens, as shared/bench/torch_gpt2_bench.py measures it.
    Train(BenchTrainArgs),
    /// Load-test a coordinator with many simulated workers: RPC latency, CPU and memory.
    Coordinator(ferry_coordinator::loadgen::BenchCoordinatorArgs),
    /// All-reduce bandwidth of the CPU ring, as shared/bench/allreduce_bench.py measures gloo.
    /// Start one process per rank; rank 0 prints the JSON lines.
    Allreduce(BenchAllreduceArgs),
}

#[derive(Args)]
struct BenchAllreduceArgs {
    #[arg(long)]
    rank: usize,
    #[arg(long)]
    world: usize,
    /// Comma-separated host:port of every rank; each rank listens on its own.
    #[arg(long, value_delimiter = ',', required = true)]
    peers: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64,256")]
    sizes_mib: Vec<usize>,
    /// auto: shared memory when all peers are on this host.
    #[arg(long, value_enum, default_value = "auto")]
    transport: Transport,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value_t = 50)]
    max_iters: usize,
    /// Approximate seconds per size; sets the iteration count.
    #[arg(long, default_value_t = 20.0)]
    budget_s: f64,
    /// Seconds to wait for a peer before failing.
    #[arg(long, default_value_t = 60)]
    timeout_s: u64,
    /// Authenticate every TCP ring message (as training always does); `false` measures the
    /// ring without it, to show what the MAC costs. Every rank must pass the same value.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    message_mac: bool,
}

#[derive(Args)]
struct ExamplesArgs {
    /// Prepared data directory (from `ferry prepare`).
    #[arg(long)]
    data: PathBuf,
    /// Model family: gpt2, gpt or bert.
    #[arg(long, default_value = "bert")]
    model: String,
    /// Tokens per example.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// The run's seed (BERT's pairs and masks derive from it and the example index).
    #[arg(long, default_value_t = ferry_spec::job::DEFAULT_SEED)]
    seed: u64,
    /// train or val.
    #[arg(long, default_value = "train")]
    split: String,
    /// The first example to show.
    #[arg(long, default_value_t = 0)]
    index: u64,
    /// How many examples to show.
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// One JSON object per example instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchTrainArgs {
    /// Model family: gpt2, gpt or bert.
    #[arg(long, default_value = "gpt2")]
    model: String,
    #[arg(long, default_value_t = 6)]
    layers: i64,
    #[arg(long, default_value_t = 384)]
    d_model: i64,
    #[arg(long, default_value_t = 6)]
    heads: i64,
    #[arg(long, default_value_t = 256)]
    ctx: i64,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    batch: i64,
    #[arg(long, default_value_t = 8192)]
    vocab: i64,
    /// Timed steps (after warm-up).
    #[arg(long, default_value_t = 30)]
    steps: usize,
    #[arg(long, default_value_t = 5)]
    warmup_steps: usize,
    /// libtorch threads, 0 = one per core.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Leave glibc's default of returning freed blocks to the kernel (the PyTorch default).
    #[arg(long)]
    default_allocator: bool,
    #[arg(long, default_value = "auto")]
    device: String,
}

fn main() {
    runtime::reproducible_blas();
    if let Err(e) = run(Cli::parse()) {
        // One line: the chain of causes joined, so each error names its file and problem.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Coordinator(a) => cluster::run_coordinator(a)?,
        Command::Worker(a) => cluster::run_worker(a)?,
        Command::Launch(a) => ferry_launch::run(a)?,
        Command::Status(a) => cluster::run_status(a)?,
        Command::Scale(a) => cluster::run_scale(a)?,
        Command::Stop(a) => cluster::run_stop(a)?,
        Command::Data(DataCommand::Fetch(a)) => ferry_fetch::cli::run(a)?,
        Command::HelpJson => {
            let spec = cli_spec::dump(<Cli as clap::CommandFactory>::command());
            println!("{}", serde_json::to_string_pretty(&spec)?);
        }
        Command::Prepare(a) => {
            let opts = PrepareOptions {
                inputs: a.inputs,
                output: a.output.clone(),
                tokenizer: a.tokenizer,
                tokenizer_kind: TokenizerKind::for_model_family(&a.model)
                    .context("--model: not a model family")?,
                vocab_size: a.vocab_size,
                val_fraction: a.val_fraction,
                seed: a.seed,
                shard_tokens: a.shard_tokens,
                csv: CsvTexts {
                    text_column: a.text_column,
                    split: a.split.map(|file| {
                        let part = Part::ALL
                            .into_iter()
                            .find(|p| p.name() == a.split_part)
                            .unwrap_or(Part::Train);
                        (file, part)
                    }),
                    encoding: a.encoding,
                },
                show_progress: !a.no_progress && std::io::stderr().is_terminal(),
                ..PrepareOptions::default()
            };
            let m = prepare(&opts)?;
            for (name, s) in &m.splits {
                println!(
                    "{name:>5}: {} tokens, {} documents, {} shard(s)",
                    s.tokens,
                    s.documents,
                    s.shards.len()
                );
            }
            println!(
                "vocabulary {} ({}), written to {}",
                m.vocab_size,
                m.tokenizer_kind,
                a.output.display()
            );
        }
        Command::Train(a) => {
            let s = a.run()?;
            println!(
                "done: {} steps, train loss {:.4}, val loss {} -> {}, {:.0} tokens/s{}",
                s.steps,
                s.last_loss,
                s.first_val_loss.map_or("-".into(), |v| format!("{v:.4}")),
                s.last_val_loss.map_or("-".into(), |v| format!("{v:.4}")),
                s.tokens_per_s,
                s.last_checkpoint
                    .map_or(String::new(), |p| format!(", checkpoint {}", p.display()))
            );
        }
        Command::Generate(a) => {
            let sampling = SamplingConfig {
                max_new_tokens: a.max_new_tokens,
                min_new_tokens: a.min_new_tokens,
                temperature: a.temperature,
                top_k: a.top_k,
                top_p: a.top_p,
                seed: a.seed,
                suppress: Vec::new(),
            };
            let device = runtime::select_device(&a.device)?;
            let text = continue_text(&a.model, &a.prompt, sampling, device)?;
            println!("{}{}", a.prompt, text);
        }
        Command::Finetune(a) => ferry_engine::finetune::cli::run_finetune(a)?,
        Command::Predict(a) => ferry_engine::finetune::cli::run_predict(a)?,
        Command::Examples(a) => examples::run(&examples::ExamplesRequest {
            data: a.data,
            family: parse_family(&a.model)?,
            seq_len: a.seq_len,
            seed: a.seed,
            split: a.split,
            index: a.index,
            count: a.count,
            json: a.json,
        })?,
        Command::Bench(BenchCommand::Coordinator(a)) => ferry_coordinator::loadgen::run(a)?,
        Command::Bench(BenchCommand::Train(a)) => {
            let r = run_train_bench(&TrainBenchConfig {
                family: parse_family(&a.model)?,
                layers: a.layers,
                d_model: a.d_model,
                heads: a.heads,
                ctx: a.ctx,
                batch: a.batch,
                vocab: a.vocab,
                steps: a.steps,
                warmup_steps: a.warmup_steps,
                threads: a.threads,
                keep_freed_memory: !a.default_allocator,
                seed: 1234,
                device: runtime::select_device(&a.device)?,
            })?;
            println!("{}", serde_json::to_string(&r)?);
        }
        Command::Bench(BenchCommand::Allreduce(a)) => {
            let config = AllReduceBenchConfig {
                rank: a.rank,
                world: a.world,
                peers: a.peers,
                sizes_mib: a.sizes_mib,
                transport: a.transport,
                warmup: a.warmup,
                max_iters: a.max_iters,
                budget_s: a.budget_s,
                timeout: std::time::Duration::from_secs(a.timeout_s),
                message_mac: a.message_mac,
            };
            let mut printed = Ok(());
            run_allreduce_bench(&config, |record| {
                if printed.is_ok() {
                    printed = serde_json::to_string(record).map(|line| println!("{line}"));
                }
            })?;
            printed?;
        }
    }
    Ok(())
}
