//! Opening a model directory: a ferry checkpoint, a run directory (its newest checkpoint), or
//! a directory saved by `transformers`' `save_pretrained` (safetensors weights).

use crate::checkpoint;
use crate::error::{EngineError, Result};
use crate::fsutil::read_json;
use crate::models::{gpt2, ParamStore};
use crate::weights;
use std::path::{Path, PathBuf};
use tch::Device;

/// Resolves a run directory to its newest checkpoint; any other directory is taken as is.
pub fn resolve_model_dir(dir: &Path) -> Result<PathBuf> {
    if !dir.is_dir() {
        return Err(EngineError::file(dir, "no such model directory"));
    }
    if dir.join(checkpoint::CONFIG_FILE).exists() {
        return Ok(dir.to_path_buf());
    }
    checkpoint::latest(dir)?
        .ok_or_else(|| EngineError::file(dir, "holds neither config.json nor checkpoints/step-*"))
}

pub struct LoadedGpt2 {
    pub dir: PathBuf,
    pub params: ParamStore,
    pub model: gpt2::Gpt2,
}

pub fn load_gpt2(dir: &Path, device: Device) -> Result<LoadedGpt2> {
    let dir = resolve_model_dir(dir)?;
    checkpoint::verify(&dir)?;
    let config_path = dir.join(checkpoint::CONFIG_FILE);
    let raw: serde_json::Value = read_json(&config_path)?;
    let model_type = raw.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
    if model_type != "gpt2" {
        return Err(EngineError::file(
            &config_path,
            format!("model_type is `{model_type}`, expected `gpt2`"),
        ));
    }
    let config: gpt2::Config = serde_json::from_value(raw)
        .map_err(|e| EngineError::file(&config_path, format!("invalid GPT-2 config: {e}")))?;
    let mut params = ParamStore::new(device);
    let model = gpt2::Gpt2::new(&mut params, &config)?;
    let weights_path = dir.join(checkpoint::MODEL_FILE);
    if !weights_path.exists() {
        return Err(EngineError::file(
            &weights_path,
            "missing (only safetensors weights are read)",
        ));
    }
    weights::load_into(
        &params,
        &weights::load_safetensors(&weights_path)?,
        "transformer.",
        &weights_path,
    )?;
    Ok(LoadedGpt2 { dir, params, model })
}
