//! One file per model family, like candle-transformers, and the two enums that let the
//! training loop, checkpoints and generation treat them alike: [`ModelConfig`] (a family's
//! `config.json`) and [`Model`] (the network built from it).

pub mod bert;
pub mod gpt;
pub mod gpt2;
pub mod layers;
pub mod overrides;
pub mod packing;
pub mod params;

use crate::error::{EngineError, Result};
use overrides::apply_overrides;
pub use params::ParamStore;
use std::path::Path;
use tch::Tensor;

/// The model families ferry pretrains: the job spec's type, one for the whole project.
pub use ferry_spec::job::ModelFamily as Family;

/// The family of a name jobs and the CLI use, or an error naming the known ones.
pub fn parse_family(name: &str) -> Result<Family> {
    Family::from_name(name).ok_or_else(|| EngineError::Config {
        field: "model".into(),
        message: format!("`{name}` is not a known model family (gpt2, gpt, bert)"),
    })
}

/// A model's configuration, of any family: what `config.json` holds.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelConfig {
    Gpt2(gpt2::Config),
    Gpt(gpt::Config),
    Bert(bert::Config),
}

impl ModelConfig {
    /// A named size (`tiny` … `large`) of `family` for a vocabulary.
    pub fn sized(family: Family, size: &str, vocab_size: i64) -> Result<ModelConfig> {
        Ok(match family {
            Family::Gpt2 => ModelConfig::Gpt2(gpt2::Config::sized(size, vocab_size)?),
            Family::Gpt => ModelConfig::Gpt(gpt::Config::sized(size, vocab_size)?),
            Family::Bert => ModelConfig::Bert(bert::Config::sized(size, vocab_size)?),
        })
    }

    pub fn family(&self) -> Family {
        match self {
            ModelConfig::Gpt2(_) => Family::Gpt2,
            ModelConfig::Gpt(_) => Family::Gpt,
            ModelConfig::Bert(_) => Family::Bert,
        }
    }

    /// The config with `field=value` overrides of its `config.json` fields applied.
    pub fn with_overrides(&self, overrides: &[String]) -> Result<ModelConfig> {
        Ok(match self {
            ModelConfig::Gpt2(c) => ModelConfig::Gpt2(apply_overrides(c, overrides)?),
            ModelConfig::Gpt(c) => ModelConfig::Gpt(apply_overrides(c, overrides)?),
            ModelConfig::Bert(c) => ModelConfig::Bert(apply_overrides(c, overrides)?),
        })
    }

    pub fn validate(&self) -> Result<()> {
        match self {
            ModelConfig::Gpt2(c) => c.validate(),
            ModelConfig::Gpt(c) => c.validate(),
            ModelConfig::Bert(c) => c.validate(),
        }
    }

    /// The longest input the position table allows.
    pub fn context(&self) -> i64 {
        match self {
            ModelConfig::Gpt2(c) => c.n_positions,
            ModelConfig::Gpt(c) => c.n_positions,
            ModelConfig::Bert(c) => c.max_position_embeddings,
        }
    }

    /// The name of the context field in `config.json`.
    pub fn context_field(&self) -> &'static str {
        match self {
            ModelConfig::Bert(_) => "max_position_embeddings",
            _ => "n_positions",
        }
    }

    pub fn set_context(&mut self, n: i64) {
        match self {
            ModelConfig::Gpt2(c) => c.n_positions = n,
            ModelConfig::Gpt(c) => c.n_positions = n,
            ModelConfig::Bert(c) => c.max_position_embeddings = n,
        }
    }

    pub fn vocab_size(&self) -> i64 {
        match self {
            ModelConfig::Gpt2(c) => c.vocab_size,
            ModelConfig::Gpt(c) => c.vocab_size,
            ModelConfig::Bert(c) => c.vocab_size,
        }
    }

    /// Layers and width, for reports.
    pub fn layers_and_width(&self) -> (i64, i64) {
        match self {
            ModelConfig::Gpt2(c) => (c.n_layer, c.n_embd),
            ModelConfig::Gpt(c) => (c.n_layer, c.n_embd),
            ModelConfig::Bert(c) => (c.num_hidden_layers, c.hidden_size),
        }
    }

    /// The document-end token of the causal families (what `transformers` pads GPT-2 with);
    /// BERT has none.
    pub fn eos_token_id(&self) -> Option<i64> {
        match self {
            ModelConfig::Gpt2(c) => c.eos_token_id,
            ModelConfig::Gpt(c) => c.eos_token_id,
            ModelConfig::Bert(_) => None,
        }
    }

    /// Records the tokenizer's special ids: the document-end token of the causal families
    /// (also what generation starts from), BERT's [PAD].
    pub fn set_special_tokens(&mut self, document_end: i64, pad: Option<i64>) {
        match self {
            ModelConfig::Gpt2(c) => {
                c.eos_token_id = Some(document_end);
                c.bos_token_id = Some(document_end);
            }
            ModelConfig::Gpt(c) => {
                c.eos_token_id = Some(document_end);
                c.bos_token_id = Some(document_end);
            }
            ModelConfig::Bert(c) => c.pad_token_id = pad.or(c.pad_token_id),
        }
    }

    /// `config.json` as `transformers` writes it for the family's pretraining class.
    pub fn to_hf_json(&self) -> serde_json::Value {
        match self {
            ModelConfig::Gpt2(c) => c.to_hf_json(),
            ModelConfig::Gpt(c) => c.to_hf_json(),
            ModelConfig::Bert(c) => c.to_hf_json(),
        }
    }

    /// Reads a `config.json` of any supported family, chosen by its `model_type`.
    pub fn from_hf_json(raw: serde_json::Value, path: &Path) -> Result<ModelConfig> {
        let model_type = raw
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        let family = Family::ALL
            .into_iter()
            .find(|f| f.model_type() == model_type)
            .ok_or_else(|| {
                EngineError::file(
                    path,
                    format!("model_type is `{model_type}`; ferry reads gpt2, openai-gpt and bert"),
                )
            })?;
        // `transformers` derives num_labels from id2label: an empty one is a broken config
        // (a classifier of no classes), whatever reads the directory.
        if raw
            .get("id2label")
            .and_then(|v| v.as_object())
            .is_some_and(|m| m.is_empty())
        {
            return Err(EngineError::file(
                path,
                "id2label is empty: a model config names at least one label, and a classifier at least 2",
            ));
        }
        let bad = |e: serde_json::Error| {
            EngineError::file(path, format!("invalid {model_type} config: {e}"))
        };
        let config = match family {
            Family::Gpt2 => ModelConfig::Gpt2(serde_json::from_value(raw).map_err(bad)?),
            Family::Gpt => ModelConfig::Gpt(serde_json::from_value(raw).map_err(bad)?),
            Family::Bert => ModelConfig::Bert(serde_json::from_value(raw).map_err(bad)?),
        };
        config
            .validate()
            .map_err(|e| EngineError::file(path, e.to_string()))?;
        Ok(config)
    }

    /// Training FLOPs per token, forward and backward, in each family's convention.
    pub fn flops_per_token(&self, seq_len: i64, params_non_embedding: i64) -> f64 {
        match self {
            ModelConfig::Gpt2(c) => c.flops_per_token(seq_len, params_non_embedding),
            ModelConfig::Gpt(c) => c.flops_per_token(seq_len, params_non_embedding),
            ModelConfig::Bert(c) => c.flops_per_token(seq_len, params_non_embedding),
        }
    }
}

/// A network of any family, its parameters registered in a [`ParamStore`].
pub enum Model {
    Gpt2(gpt2::Gpt2),
    Gpt(gpt::Gpt),
    Bert(bert::Bert),
}

impl Model {
    pub fn new(ps: &mut ParamStore, config: &ModelConfig) -> Result<Model> {
        Ok(match config {
            ModelConfig::Gpt2(c) => Model::Gpt2(gpt2::Gpt2::new(ps, c)?),
            ModelConfig::Gpt(c) => Model::Gpt(gpt::Gpt::new(ps, c)?),
            ModelConfig::Bert(c) => Model::Bert(bert::Bert::new(ps, c)?),
        })
    }

    pub fn config(&self) -> ModelConfig {
        match self {
            Model::Gpt2(m) => ModelConfig::Gpt2(m.config.clone()),
            Model::Gpt(m) => ModelConfig::Gpt(m.config.clone()),
            Model::Bert(m) => ModelConfig::Bert(m.config.clone()),
        }
    }

    pub fn non_embedding_params(&self, ps: &ParamStore) -> i64 {
        match self {
            Model::Gpt2(m) => m.non_embedding_params(ps),
            Model::Gpt(m) => m.non_embedding_params(ps),
            Model::Bert(m) => m.non_embedding_params(ps),
        }
    }

    /// The model as a causal LM; `None` for BERT.
    pub fn as_causal(&self) -> Option<&dyn CausalLm> {
        match self {
            Model::Gpt2(m) => Some(m),
            Model::Gpt(m) => Some(m),
            Model::Bert(_) => None,
        }
    }
}

/// What training on next tokens and generation need of a decoder.
pub trait CausalLm {
    /// Logits [batch, time, vocab] for token ids [batch, time].
    fn logits(&self, input_ids: &Tensor) -> Tensor;
    /// Sum of next-token cross-entropy over every position (targets [batch, time]).
    fn lm_loss_sum(&self, input_ids: &Tensor, targets: &Tensor, train: bool) -> Tensor;
    /// The longest input the model takes.
    fn context(&self) -> i64;
    fn eos_token_id(&self) -> Option<i64>;
    fn device(&self) -> tch::Device;
}

impl CausalLm for gpt2::Gpt2 {
    fn logits(&self, input_ids: &Tensor) -> Tensor {
        gpt2::Gpt2::logits(self, input_ids)
    }
    fn lm_loss_sum(&self, input_ids: &Tensor, targets: &Tensor, train: bool) -> Tensor {
        gpt2::Gpt2::lm_loss_sum(self, input_ids, targets, train)
    }
    fn context(&self) -> i64 {
        self.config.n_positions
    }
    fn eos_token_id(&self) -> Option<i64> {
        self.config.eos_token_id
    }
    fn device(&self) -> tch::Device {
        self.wte_device()
    }
}

impl CausalLm for gpt::Gpt {
    fn logits(&self, input_ids: &Tensor) -> Tensor {
        gpt::Gpt::logits(self, input_ids)
    }
    fn lm_loss_sum(&self, input_ids: &Tensor, targets: &Tensor, train: bool) -> Tensor {
        gpt::Gpt::lm_loss_sum(self, input_ids, targets, train)
    }
    fn context(&self) -> i64 {
        self.config.n_positions
    }
    fn eos_token_id(&self) -> Option<i64> {
        self.config.eos_token_id
    }
    fn device(&self) -> tch::Device {
        gpt::Gpt::device(self)
    }
}

/// Sum of cross-entropy of logits [.., vocab] against targets [..], -100 ignored.
pub(crate) fn token_cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Tensor {
    let v = *logits.size().last().expect("logits have a vocab dimension");
    logits.reshape([-1, v]).cross_entropy_loss::<Tensor>(
        &targets.reshape([-1]),
        None,
        tch::Reduction::Sum,
        -100,
        0.0,
    )
}

pub(crate) fn check_positive(fields: &[(&str, i64)]) -> Result<()> {
    match fields.iter().find(|(_, v)| *v <= 0) {
        Some((field, v)) => Err(EngineError::Config {
            field: (*field).into(),
            message: format!("must be positive, got {v}"),
        }),
        None => Ok(()),
    }
}

/// Dropout probabilities must be in [0, 1): libtorch refuses others mid-step, and 1 drops
/// everything.
pub(crate) fn check_dropout(fields: &[(&str, f64)]) -> Result<()> {
    match fields.iter().find(|(_, p)| !(0.0..1.0).contains(p)) {
        Some((field, p)) => Err(EngineError::Config {
            field: (*field).into(),
            message: format!("a dropout probability must be in [0, 1), got {p}"),
        }),
        None => Ok(()),
    }
}

pub(crate) fn check_heads(field: &str, width: i64, heads: i64) -> Result<()> {
    if width % heads != 0 {
        return Err(EngineError::Config {
            field: field.into(),
            message: format!("the width ({width}) must be divisible by the head count ({heads})"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_spec::job::MODEL_SIZES;

    /// The job spec checks `data.seq_len` against a context table of its own (the coordinator
    /// does not link the models); it must agree with the models' named sizes.
    #[test]
    fn job_spec_context_lengths_match_the_models() {
        for family in Family::ALL {
            for size in MODEL_SIZES {
                let model = ModelConfig::sized(family, size, 100).unwrap();
                assert_eq!(
                    family.context_length(size),
                    Some(model.context() as u64),
                    "{} {size}",
                    family.name()
                );
                assert_eq!(family.context_field(), model.context_field());
            }
        }
    }
}

/// A model config as `transformers` writes it in `config.json`: the config's own fields, the
/// architecture and model type, tied embeddings, float32, and the family's `extra` keys.
fn hf_config_json<const N: usize>(
    config: &impl serde::Serialize,
    architecture: &str,
    model_type: &str,
    extra: [(&str, serde_json::Value); N],
) -> serde_json::Value {
    let mut v = serde_json::to_value(config).expect("a model config serialises");
    let o = v.as_object_mut().expect("a model config is a JSON object");
    o.insert("architectures".into(), serde_json::json!([architecture]));
    o.insert("model_type".into(), model_type.into());
    o.insert("tie_word_embeddings".into(), true.into());
    o.insert("dtype".into(), "float32".into());
    for (key, value) in extra {
        o.insert(key.into(), value);
    }
    v
}
