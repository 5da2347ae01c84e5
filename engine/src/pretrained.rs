//! Opening a model directory: a ferry checkpoint, a run directory (its newest checkpoint), or
//! a directory saved by `transformers`' `save_pretrained` (safetensors weights), of any family.

use crate::checkpoint;
use crate::error::{EngineError, Result};
use crate::fsutil::read_json;
use crate::models::{Model, ModelConfig, ParamStore};
use crate::weights;
use ferry_dataset::tokenizer::token_id_count;
use std::path::{Path, PathBuf};
use tch::Device;
use tokenizers::Tokenizer;

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

/// Resolves `dir` ([`resolve_model_dir`]), checks its `checksums.json` when there is one and
/// reads its `config.json`: what every reader of a model directory starts with.
pub fn open_model_dir(dir: &Path) -> Result<(PathBuf, ModelConfig)> {
    let dir = resolve_model_dir(dir)?;
    checkpoint::verify(&dir)?;
    let config_path = dir.join(checkpoint::CONFIG_FILE);
    let config = ModelConfig::from_hf_json(read_json(&config_path)?, &config_path)?;
    Ok((dir, config))
}

/// Refuses a tokenizer with ids the model has no embedding row for (they would fail deep in
/// libtorch, or only for some texts), naming both files and both numbers.
pub fn check_tokenizer_fits(
    tokenizer: &Tokenizer,
    tokenizer_path: &Path,
    config: &ModelConfig,
    config_path: &Path,
) -> Result<()> {
    let ids = token_id_count(tokenizer) as i64;
    if ids > config.vocab_size() {
        return Err(EngineError::file(
            tokenizer_path,
            format!(
                "has {ids} token ids, more than the vocab_size {} of {}: not this model's tokenizer",
                config.vocab_size(),
                config_path.display()
            ),
        ));
    }
    Ok(())
}

/// Loads `dir/tokenizer.json` for the model whose config is `dir/config.json`, checked with
/// [`check_tokenizer_fits`].
pub fn load_tokenizer_for(dir: &Path, config: &ModelConfig) -> Result<Tokenizer> {
    let path = dir.join(checkpoint::TOKENIZER_FILE);
    let tokenizer = ferry_dataset::tokenizer::load_tokenizer(&path)?;
    check_tokenizer_fits(
        &tokenizer,
        &path,
        config,
        &dir.join(checkpoint::CONFIG_FILE),
    )?;
    Ok(tokenizer)
}

pub struct LoadedModel {
    pub dir: PathBuf,
    pub params: ParamStore,
    pub config: ModelConfig,
    pub model: Model,
}

/// Reads `config.json` (its `model_type` picks the family), builds the model and loads
/// `model.safetensors` into it, after checking `checksums.json` when there is one.
pub fn load_model(dir: &Path, device: Device) -> Result<LoadedModel> {
    let (dir, config) = open_model_dir(dir)?;
    let mut params = ParamStore::new(device);
    let model = Model::new(&mut params, &config)?;
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
        config.family().base_prefix(),
        &weights_path,
    )?;
    Ok(LoadedModel {
        dir,
        params,
        config,
        model,
    })
}
