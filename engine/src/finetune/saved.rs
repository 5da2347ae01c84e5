//! A fine-tuned model on disk: a `transformers` model directory (`config.json` naming the
//! `…ForSequenceClassification` class with `id2label`, `model.safetensors`, `tokenizer.json`)
//! plus `finetune.json` (how ferry framed the texts) and `checksums.json`.
//!
//! A directory saved by `transformers` itself loads too: without `finetune.json` the labels
//! come from `id2label` and the framing from the family's defaults.

use super::classifier::{Classifier, Pooling};
use super::encode::TextEncoder;
use crate::checkpoint::{self, CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE};
use crate::error::{EngineError, Result};
use crate::fsutil::{read_json, write_json};
use crate::models::{ModelConfig, ParamStore};
use crate::weights;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::Device;

pub const FINETUNE_FILE: &str = "finetune.json";
/// Tokens per text when a directory does not say.
pub const DEFAULT_MAX_LEN: usize = 128;

/// How a fine-tuned model reads its inputs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct FinetuneInfo {
    /// Class names, in the head's output order.
    pub labels: Vec<String>,
    pub max_len: usize,
    pub pooling: Pooling,
    pub text_column: String,
    pub label_column: String,
    /// The checkpoint it was fine-tuned from, or `scratch`.
    pub from: String,
}

pub struct FinetunedModel {
    pub dir: PathBuf,
    pub params: ParamStore,
    pub classifier: Classifier,
    pub encoder: TextEncoder,
    pub info: FinetuneInfo,
}

/// Writes `dir` atomically (built beside it and renamed), with checksums.
pub fn save(
    dir: &Path,
    params: &ParamStore,
    classifier: &Classifier,
    encoder: &TextEncoder,
    info: &FinetuneInfo,
    tokenizer: &Path,
) -> Result<()> {
    checkpoint::write_verified_dir(dir, |tmp| {
        weights::save_safetensors(&tmp.join(MODEL_FILE), params.named())?;
        write_json(
            &tmp.join(CONFIG_FILE),
            &classifier.to_hf_json(&info.labels, encoder.pad_id()),
        )?;
        std::fs::copy(tokenizer, tmp.join(TOKENIZER_FILE))
            .map_err(|e| EngineError::io(tokenizer, e))?;
        write_json(&tmp.join(FINETUNE_FILE), info)
    })
}

/// Opens a fine-tuned model directory (ferry's or `transformers`').
pub fn load(dir: &Path, device: Device) -> Result<FinetunedModel> {
    if !dir.join(CONFIG_FILE).is_file() {
        return Err(EngineError::file(
            dir,
            "is not a model directory (no config.json)",
        ));
    }
    checkpoint::verify(dir)?;
    let config_path = dir.join(CONFIG_FILE);
    let raw: serde_json::Value = read_json(&config_path)?;
    let labels = labels_of(&raw, &config_path)?;
    let config = ModelConfig::from_hf_json(raw.clone(), &config_path)?;
    let family = config.family();
    let info_path = dir.join(FINETUNE_FILE);
    let info: FinetuneInfo = if info_path.exists() {
        read_json(&info_path)?
    } else {
        FinetuneInfo {
            labels: labels.clone(),
            max_len: DEFAULT_MAX_LEN,
            pooling: Pooling::default_for(family),
            text_column: "text".into(),
            label_column: "label".into(),
            from: dir.display().to_string(),
        }
    };
    if info.labels != labels {
        return Err(EngineError::file(
            &info_path,
            format!(
                "labels {:?} differ from config.json's id2label {:?}",
                info.labels, labels
            ),
        ));
    }
    let mut params = ParamStore::new(device);
    let classifier = Classifier::new(&mut params, &config, labels.len() as i64, info.pooling, 0.0)?;
    let weights_path = dir.join(MODEL_FILE);
    weights::load_into(
        &params,
        &weights::load_safetensors(&weights_path)?,
        family.base_prefix(),
        &weights_path,
    )?;
    let tokenizer_path = dir.join(TOKENIZER_FILE);
    let tokenizer = crate::pretrained::load_tokenizer_for(dir, &config)?;
    let pad = raw.get("pad_token_id").and_then(|v| v.as_i64());
    let encoder = TextEncoder::new(tokenizer, &tokenizer_path, family, info.max_len, pad)?;
    Ok(FinetunedModel {
        dir: dir.to_path_buf(),
        params,
        classifier,
        encoder,
        info,
    })
}

/// `id2label` in id order.
fn labels_of(raw: &serde_json::Value, path: &Path) -> Result<Vec<String>> {
    let map = raw
        .get("id2label")
        .and_then(|v| v.as_object())
        .ok_or_else(|| {
            EngineError::file(
                path,
                "has no id2label: not a sequence-classification model (fine-tune one with ferry finetune)",
            )
        })?;
    if map.len() < 2 {
        return Err(EngineError::file(
            path,
            format!(
                "id2label has {} label(s); a classifier needs at least 2",
                map.len()
            ),
        ));
    }
    let mut labels = vec![None; map.len()];
    for (id, name) in map {
        let slot = id
            .parse::<usize>()
            .ok()
            .and_then(|i| labels.get_mut(i))
            .ok_or_else(|| EngineError::file(path, format!("id2label has a bad id {id:?}")))?;
        *slot = name.as_str().map(str::to_string);
    }
    labels
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| EngineError::file(path, "id2label names must be strings"))
}
