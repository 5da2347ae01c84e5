//! The checks a fine-tuning run makes before it starts: its settings, and that its output
//! directory holds nothing a user would lose.

use super::run::{FinetuneConfig, MODEL_DIR, REPORT_JSON, REPORT_SVG, SPLIT_FILE};
use crate::checkpoint::{CONFIG_FILE, MODEL_FILE};
use crate::error::{EngineError, Result};
use std::path::Path;

pub(super) fn check(cfg: &FinetuneConfig) -> Result<()> {
    let bad = |field: &str, message: String| {
        Err(EngineError::Config {
            field: field.into(),
            message,
        })
    };
    if cfg.train_examples == Some(0) {
        return bad("train_examples", "must be at least 1".into());
    }
    if cfg.batch_size == 0 {
        return bad("batch_size", "must be at least 1".into());
    }
    if cfg.epochs == 0 && cfg.max_steps == 0 {
        return bad("epochs", "must be at least 1".into());
    }
    if !(cfg.lr > 0.0 && cfg.lr.is_finite()) {
        return bad("lr", format!("must be positive, got {}", cfg.lr));
    }
    if !(cfg.layer_lr_decay >= 1.0) {
        return bad(
            "layer_lr_decay",
            format!(
                "must be >= 1 (1 = off, ULMFiT 2.6), got {}",
                cfg.layer_lr_decay
            ),
        );
    }
    if !(0.0..1.0).contains(&cfg.warmup_frac) {
        return bad(
            "warmup_frac",
            format!("must be in [0, 1), got {}", cfg.warmup_frac),
        );
    }
    if !(0.0..1.0).contains(&cfg.dropout) {
        return bad("dropout", format!("must be in [0, 1), got {}", cfg.dropout));
    }
    Ok(())
}

/// What a run writes into its output directory; with `--overwrite` these are replaced and
/// anything else there is kept.
const OUTPUTS: [&str; 4] = [SPLIT_FILE, REPORT_JSON, REPORT_SVG, MODEL_DIR];

/// Nothing a user made is lost: an output directory that holds anything (an earlier run, a
/// model directory, other files) is refused unless `overwrite`; an empty one is fine.
pub(super) fn check_output(output: &Path, overwrite: bool) -> Result<()> {
    let entries = match std::fs::read_dir(output) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(_) if output.exists() && !output.is_dir() => {
            return Err(EngineError::file(
                output,
                "exists and is not a directory; choose another --output",
            ))
        }
        Err(e) => return Err(EngineError::io(output, e)),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if names.is_empty() || overwrite {
        return Ok(());
    }
    names.sort();
    let ours: Vec<&str> = OUTPUTS
        .into_iter()
        .filter(|o| names.iter().any(|n| n == o))
        .collect();
    let what = if !ours.is_empty() {
        format!(
            "holds an earlier fine-tuning's output ({})",
            ours.join(", ")
        )
    } else if names.iter().any(|n| n == CONFIG_FILE || n == MODEL_FILE) {
        "is a model directory".to_string()
    } else {
        let more = if names.len() > 3 { ", …" } else { "" };
        format!(
            "is not empty ({}{more})",
            names[..names.len().min(3)].join(", ")
        )
    };
    Err(EngineError::file(
        output,
        format!(
            "{what}; refusing to overwrite it: choose another --output, or pass --overwrite to \
             replace split.json, report.json, report.svg and model/ there (other files are kept)"
        ),
    ))
}
