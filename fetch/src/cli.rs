//! `ferry data fetch`'s arguments and what it prints.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::{fetch, FetchError, Options, Outcome, Patience, Sources};

#[derive(Args, Debug)]
pub struct FetchArgs {
    /// The data directory to fill: wikitext/, books/ and airline/ land in it.
    #[arg(long, env = "FERRY_DATA_DIR")]
    pub data_dir: PathBuf,
    /// A sources file to use instead of the built-in one (fetch/sources.toml in the repository):
    /// URLs, mirrors, pinned digests and where each file lands.
    #[arg(long)]
    pub sources: Option<PathBuf>,
    /// Fetch only these sources (by name; repeat or separate with commas).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Seconds allowed to connect, and for each read; a host that takes longer fails the attempt.
    #[arg(long, default_value_t = 30.0)]
    pub timeout_s: f64,
    /// Attempts after the first for each URL, each continuing where the last stopped.
    #[arg(long, default_value_t = 3)]
    pub retries: u32,
    /// Replace files in the data directory that differ from the pinned ones (default: refuse).
    #[arg(long)]
    pub overwrite: bool,
    /// List the sources and their pins, and fetch nothing.
    #[arg(long)]
    pub list: bool,
}

pub fn run(args: FetchArgs) -> Result<(), FetchError> {
    let sources = match &args.sources {
        Some(path) => Sources::read(path)?,
        None => Sources::built_in()?,
    };
    let selected = sources.select(&args.only)?;
    if args.list {
        for s in &selected {
            let pin = match (&s.pins.sha256, &s.pins.sha1, &s.unpinned) {
                (Some(d), _, _) => format!("sha256 {d}"),
                (None, Some(d), _) => format!("sha1 {d}"),
                (None, None, why) => format!("not pinned: {}", why.as_deref().unwrap_or("")),
            };
            println!("{:<14} {}  ({pin})", s.name, s.urls[0]);
            for m in &s.files {
                println!("{:<14}   -> {}", "", m.to.display());
            }
        }
        return Ok(());
    }
    if !(args.timeout_s.is_finite() && args.timeout_s > 0.0) {
        return Err(FetchError::Sources {
            origin: "--timeout-s".into(),
            reason: format!("{} must be a positive number of seconds", args.timeout_s),
        });
    }
    let options = Options {
        patience: Patience {
            timeout: Duration::from_secs_f64(args.timeout_s),
            retries: args.retries,
            backoff: Duration::from_secs(1),
        },
        overwrite: args.overwrite,
        show_progress: std::io::stderr().is_terminal(),
    };
    let outcomes = fetch(&args.data_dir, &selected, &options)?;
    println!(
        "{:<14} {:>12}  {:>5}  result",
        "source", "downloaded", "files"
    );
    for (name, outcome) in outcomes {
        match outcome {
            Outcome::UpToDate => println!("{name:<14} {:>12}  {:>5}  up to date", "-", "-"),
            Outcome::Fetched {
                download_bytes,
                files,
                ..
            } => println!("{name:<14} {download_bytes:>12}  {files:>5}  fetched and checked"),
        }
    }
    println!("data directory: {}", args.data_dir.display());
    Ok(())
}
