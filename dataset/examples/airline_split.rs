//! Writes a seeded stratified 80/10/10 `split.json` for a labelled CSV, without the `ferry`
//! binary (and so without libtorch), for the TF-IDF baseline and for comparing runs:
//!
//! ```text
//! cargo run -p ferry-dataset --example airline_split -- CSV OUT.json [SEED] [TEXT_COLUMN] [LABEL_COLUMN]
//! ```
//!
//! SEED defaults to 0 and the columns to the airline file's `text` and `airline_sentiment`.

use std::path::PathBuf;
use std::process::ExitCode;

use ferry_dataset::textcls::{read_labelled_csv, Part, Split, SplitFractions};

const USAGE: &str =
    "usage: airline_split CSV OUT.json [SEED] [TEXT_COLUMN] [LABEL_COLUMN]  (defaults: 0 text airline_sentiment)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 || args.len() > 5 || args.iter().any(|a| a == "-h" || a == "--help") {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    }
    let (csv, out) = (PathBuf::from(&args[0]), PathBuf::from(&args[1]));
    let seed = match args.get(2).map_or(Ok(0), |s| s.parse::<u64>()) {
        Ok(seed) => seed,
        Err(e) => {
            eprintln!("bad SEED {:?}: {e}\n{USAGE}", args[2]);
            return ExitCode::from(2);
        }
    };
    let text_column = args.get(3).map_or("text", String::as_str);
    let label_column = args.get(4).map_or("airline_sentiment", String::as_str);
    match run(&csv, &out, seed, text_column, label_column) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(
    csv: &std::path::Path,
    out: &std::path::Path,
    seed: u64,
    text_column: &str,
    label_column: &str,
) -> Result<(), ferry_dataset::DataError> {
    let set = read_labelled_csv(csv, text_column, Some(label_column), None)?;
    let counts: Vec<String> = set.counts().map(|(l, n)| format!("{l} {n}")).collect();
    println!(
        "{}: {} records; labels: {}",
        csv.display(),
        set.len(),
        counts.join(", ")
    );
    let split = Split::stratified(&set, SplitFractions::default(), seed)?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| ferry_dataset::DataError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    split.save(out)?;
    let sizes: Vec<String> = Part::ALL
        .iter()
        .map(|&p| format!("{} {}", p.name(), split.indices(p).len()))
        .collect();
    println!("seed {seed}: {} -> {}", sizes.join(", "), out.display());
    Ok(())
}
