//! Sequence classification on top of a pretrained body, in `transformers`' layouts:
//! `BertForSequenceClassification` (pooled [CLS] → dropout → `classifier`, with bias),
//! `GPT2ForSequenceClassification` and `OpenAIGPTForSequenceClassification` (the last real
//! token's hidden state → `score`, no bias). For the causal families `concat` pooling
//! (ULMFiT's: last ‖ max ‖ mean over the real tokens) is offered too; its `score` is
//! [labels, 3·width], which `transformers` cannot load, so `last` is the default.

use crate::error::{EngineError, Result};
use crate::models::bert::{Bert, BertInputs};
use crate::models::layers::Linear;
use crate::models::{gpt, gpt2, Family, ModelConfig, ParamStore};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// How a sequence of hidden states becomes one vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// BERT: the pooler's tanh(W·h[CLS] + b).
    Cls,
    /// GPT, GPT-2: the hidden state of the last real (not padding) token.
    Last,
    /// GPT, GPT-2: last ‖ max ‖ mean of the real tokens' hidden states.
    Concat,
}

impl Pooling {
    pub fn default_for(family: Family) -> Pooling {
        match family {
            Family::Bert => Pooling::Cls,
            Family::Gpt2 | Family::Gpt => Pooling::Last,
        }
    }

    fn check(self, family: Family) -> Result<()> {
        let ok = match family {
            Family::Bert => self == Pooling::Cls,
            Family::Gpt2 | Family::Gpt => self != Pooling::Cls,
        };
        if ok {
            Ok(())
        } else {
            Err(EngineError::Config {
                field: "pooling".into(),
                message: format!(
                    "{self:?} pooling does not apply to {} (bert: cls; gpt, gpt2: last, concat)",
                    family.name()
                ),
            })
        }
    }
}

/// Padded token ids of a batch of texts, right-padded.
pub struct TextBatch {
    pub input_ids: Tensor,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// Index of each row's last real token.
    pub last: Tensor,
}

impl TextBatch {
    /// Pads `rows` (each non-empty) with `pad` to the longest row.
    pub fn new(rows: &[Vec<i64>], pad: i64, device: tch::Device) -> TextBatch {
        let width = rows.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let mut ids = Vec::with_capacity(rows.len() * width);
        let mut mask = Vec::with_capacity(rows.len() * width);
        for row in rows {
            ids.extend_from_slice(row);
            ids.extend(std::iter::repeat_n(pad, width - row.len()));
            mask.extend(std::iter::repeat_n(1i64, row.len()));
            mask.extend(std::iter::repeat_n(0i64, width - row.len()));
        }
        let last: Vec<i64> = rows.iter().map(|r| r.len().max(1) as i64 - 1).collect();
        let shape = [rows.len() as i64, width as i64];
        TextBatch {
            input_ids: Tensor::from_slice(&ids).reshape(shape).to_device(device),
            attention_mask: Tensor::from_slice(&mask).reshape(shape).to_device(device),
            last: Tensor::from_slice(&last).to_device(device),
        }
    }
}

enum Body {
    Bert(Bert),
    Gpt2(gpt2::Gpt2),
    Gpt(gpt::Gpt),
}

pub struct Classifier {
    pub config: ModelConfig,
    body: Body,
    head: Linear,
    pub pooling: Pooling,
    /// Dropout before the head (BERT's `hidden_dropout_prob` convention; 0 for the GPTs).
    dropout: f64,
    pub num_labels: i64,
}

impl Classifier {
    /// The body of `config`'s family without its pretraining heads, and a fresh head for
    /// `num_labels` classes, initialised N(0, initializer_range) as `transformers` does.
    pub fn new(
        ps: &mut ParamStore,
        config: &ModelConfig,
        num_labels: i64,
        pooling: Pooling,
        dropout: f64,
    ) -> Result<Classifier> {
        pooling.check(config.family())?;
        if num_labels < 2 {
            return Err(EngineError::Config {
                field: "labels".into(),
                message: format!("classification needs at least 2 labels, found {num_labels}"),
            });
        }
        let (_, width) = config.layers_and_width();
        // The causal families' `score` has no bias and reads the pooled width.
        let score = |ps: &mut ParamStore, std: f64| {
            let n_in = if pooling == Pooling::Concat {
                3 * width
            } else {
                width
            };
            Linear::new(ps, "score", n_in, num_labels, std, false)
        };
        let (body, head) = match config {
            ModelConfig::Bert(c) => {
                let body = Body::Bert(Bert::encoder_only(ps, c)?);
                let std = c.initializer_range;
                (
                    body,
                    Linear::new(ps, "classifier", width, num_labels, std, true),
                )
            }
            ModelConfig::Gpt2(c) => (
                Body::Gpt2(gpt2::Gpt2::new(ps, c)?),
                score(ps, c.initializer_range),
            ),
            ModelConfig::Gpt(c) => (
                Body::Gpt(gpt::Gpt::new(ps, c)?),
                score(ps, c.initializer_range),
            ),
        };
        Ok(Classifier {
            config: config.clone(),
            body,
            head,
            pooling,
            dropout,
            num_labels,
        })
    }

    /// Class logits [batch, labels].
    pub fn logits(&self, batch: &TextBatch, train: bool) -> Tensor {
        let pooled = match &self.body {
            Body::Bert(bert) => {
                let types = batch.input_ids.zeros_like();
                let hidden = bert.encode_real(
                    &BertInputs {
                        input_ids: &batch.input_ids,
                        token_type_ids: &types,
                        attention_mask: &batch.attention_mask,
                    },
                    train,
                );
                bert.pooled(&hidden)
            }
            Body::Gpt2(m) => self.pool_causal(
                &m.hidden_states(&batch.input_ids, Some(&batch.attention_mask), train),
                batch,
            ),
            Body::Gpt(m) => self.pool_causal(
                &m.hidden_states(&batch.input_ids, Some(&batch.attention_mask), train),
                batch,
            ),
        };
        self.head.forward(&pooled.dropout(self.dropout, train))
    }

    /// Causal attention never lets a real token see the padding after it, so the last real
    /// token's state is that of the unpadded text.
    fn pool_causal(&self, hidden: &Tensor, batch: &TextBatch) -> Tensor {
        let b = hidden.size()[0];
        let rows = Tensor::arange(b, (Kind::Int64, hidden.device()));
        let last = hidden.index(&[Some(rows), Some(batch.last.shallow_clone())]);
        if self.pooling != Pooling::Concat {
            return last;
        }
        let mask = batch.attention_mask.unsqueeze(-1).to_kind(hidden.kind());
        let max = (hidden + (mask.ones_like() - &mask) * -1e9).amax([1], false);
        let mean = (hidden * &mask).sum_dim_intlist([1i64].as_slice(), false, hidden.kind())
            / mask.sum_dim_intlist([1i64].as_slice(), false, hidden.kind());
        Tensor::cat(&[last, max, mean], 1)
    }

    /// Layer groups for discriminative learning rates and gradual unfreezing, by parameter
    /// name: 0 the embeddings, 1..=L the blocks bottom to top, L+1 the rest (final LayerNorm,
    /// pooler, head). Returns one group index per parameter of `ps`, and the group count.
    pub fn layer_groups(&self, ps: &ParamStore) -> (Vec<usize>, usize) {
        let (layers, _) = self.config.layers_and_width();
        let top = layers as usize + 1;
        let groups = ps
            .named()
            .iter()
            .map(|(name, _)| layer_group(name, top))
            .collect();
        (groups, top + 1)
    }

    /// `config.json` for the family's `…ForSequenceClassification` class.
    pub fn to_hf_json(&self, labels: &[String], pad_token_id: i64) -> serde_json::Value {
        let mut v = self.config.to_hf_json();
        let o = v.as_object_mut().expect("object");
        let class = match self.config.family() {
            Family::Bert => "BertForSequenceClassification",
            Family::Gpt2 => "GPT2ForSequenceClassification",
            Family::Gpt => "OpenAIGPTForSequenceClassification",
        };
        o.insert("architectures".into(), serde_json::json!([class]));
        let id2label: serde_json::Map<String, serde_json::Value> = labels
            .iter()
            .enumerate()
            .map(|(i, l)| (i.to_string(), l.clone().into()))
            .collect();
        let label2id: serde_json::Map<String, serde_json::Value> = labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.clone(), i.into()))
            .collect();
        o.insert("id2label".into(), id2label.into());
        o.insert("label2id".into(), label2id.into());
        o.insert("problem_type".into(), "single_label_classification".into());
        o.insert("pad_token_id".into(), pad_token_id.into());
        o.insert(
            "ferry_pooling".into(),
            serde_json::to_value(self.pooling).unwrap_or_default(),
        );
        v
    }
}

/// The group of a parameter named as `transformers` names it (see [`Classifier::layer_groups`]).
fn layer_group(name: &str, top: usize) -> usize {
    let block = [".h.", ".layer."].iter().find_map(|marker| {
        let rest = name.split(marker).nth(1)?;
        rest.split('.').next()?.parse::<usize>().ok()
    });
    if let Some(i) = block {
        return i + 1;
    }
    let embedding = name.contains("embed") || [".wte.", ".wpe."].iter().any(|e| name.contains(e));
    if embedding {
        0
    } else {
        top
    }
}

#[cfg(test)]
mod tests {
    use super::layer_group;

    #[test]
    fn parameters_fall_into_their_layer_groups() {
        let top = 3;
        for (name, group) in [
            ("transformer.wte.weight", 0),
            ("transformer.wpe.weight", 0),
            ("transformer.tokens_embed.weight", 0),
            ("bert.embeddings.LayerNorm.weight", 0),
            ("transformer.h.0.attn.c_attn.weight", 1),
            ("transformer.h.1.mlp.c_proj.bias", 2),
            ("bert.encoder.layer.1.output.dense.weight", 2),
            ("transformer.ln_f.weight", 3),
            ("bert.pooler.dense.weight", 3),
            ("classifier.weight", 3),
            ("score.weight", 3),
        ] {
            assert_eq!(layer_group(name, top), group, "{name}");
        }
    }
}
