//! Pretraining objectives: how the sequence ids of a step become tensors and a loss.
//!
//! - Causal LM (GPT, GPT-2): sequence `i` is the window of `seq_len + 1` tokens from token
//!   `i * seq_len`; every position predicts the next token.
//! - Masked LM + next-sentence prediction (BERT): sequence `i` is sentence-pair example `i`
//!   ([`ferry_dataset::sentence_pairs`]); the chosen ~15% of tokens and the pair label are
//!   predicted.
//!
//! Losses are sums divided by counts over the whole global step (tokens for the causal LM;
//! predicted tokens and pairs for BERT), so that gradients summed over micro-batches and
//! ranks are the step's mean, whatever the number of processes.

use crate::error::Result;
use crate::models::bert::{Bert, BertInputs};
use crate::models::{CausalLm, Model};
use crate::runtime::{with_precision, Precision};
use ferry_dataset::sentence_pairs::{BertExample, PairBuilder, IGNORE_LABEL};
use ferry_dataset::shards::TokenSplit;
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

pub enum Objective {
    CausalLm,
    MaskedLm(PairBuilder),
}

/// What a step's losses are divided by; the same on every rank.
#[derive(Clone, Copy, Debug)]
pub enum StepCounts {
    /// Target tokens in the global step.
    Tokens(f64),
    /// Predicted tokens and sentence pairs in the global step.
    Bert { predicted: f64, pairs: f64 },
}

/// Held-out metrics of one evaluation.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalReport {
    /// The loss training minimises: next-token cross-entropy, or MLM + NSP cross-entropy.
    pub loss: f64,
    /// exp of the (masked) LM cross-entropy per predicted token.
    pub perplexity: f64,
    pub bert: Option<BertEval>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BertEval {
    pub mlm_loss: f64,
    pub nsp_loss: f64,
    pub mlm_accuracy: f64,
    pub nsp_accuracy: f64,
    pub predicted_tokens: i64,
    pub pairs: i64,
}

impl EvalReport {
    /// The `metrics.jsonl` record of an evaluation at `step`.
    pub fn record(&self, step: u64) -> Value {
        let mut v = json!({"event": "eval", "step": step, "val_loss": self.loss, "val_ppl": self.perplexity});
        if let Some(b) = &self.bert {
            let o = v.as_object_mut().expect("object");
            o.insert("val_mlm_loss".into(), b.mlm_loss.into());
            o.insert("val_nsp_loss".into(), b.nsp_loss.into());
            o.insert("val_mlm_acc".into(), b.mlm_accuracy.into());
            o.insert("val_nsp_acc".into(), b.nsp_accuracy.into());
            o.insert("val_pairs".into(), b.pairs.into());
        }
        v
    }

    /// One line for the terminal.
    pub fn summary(&self, step: u64) -> String {
        let mut s = format!(
            "step {step:>6}  val_loss {:.4}  val_ppl {:.1}",
            self.loss, self.perplexity
        );
        if let Some(b) = &self.bert {
            s.push_str(&format!(
                "  mlm_acc {:.4}  nsp_acc {:.4} ({} pairs)",
                b.mlm_accuracy, b.nsp_accuracy, b.pairs
            ));
        }
        s
    }
}

/// Causal windows `[batch, seq_len + 1]` as (inputs, targets) on the device.
pub fn causal_batch(
    split: &TokenSplit,
    ids: &[u64],
    seq_len: usize,
    device: Device,
) -> Result<(Tensor, Tensor)> {
    let mut all = Vec::with_capacity(ids.len() * (seq_len + 1));
    let mut seq = Vec::with_capacity(seq_len + 1);
    for &i in ids {
        split.sequence(i, seq_len, &mut seq)?;
        all.extend_from_slice(&seq);
    }
    let tokens = Tensor::from_slice(&all)
        .reshape([ids.len() as i64, seq_len as i64 + 1])
        .to_device(device);
    let t = seq_len as i64;
    Ok((tokens.narrow(1, 0, t), tokens.narrow(1, 1, t)))
}

/// A batch of BERT examples as tensors.
pub struct BertBatch {
    pub input_ids: Tensor,
    pub token_type_ids: Tensor,
    pub attention_mask: Tensor,
    pub mlm_labels: Tensor,
    pub nsp_labels: Tensor,
}

impl BertBatch {
    /// Examples `ids` of `split`, built and stacked.
    pub fn build(
        builder: &PairBuilder,
        split: &TokenSplit,
        ids: &[u64],
        device: Device,
    ) -> Result<BertBatch> {
        let examples = ids
            .iter()
            .map(|&i| builder.example(split, i))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(BertBatch::from_examples(&examples, device))
    }

    pub fn from_examples(examples: &[BertExample], device: Device) -> BertBatch {
        let rows = examples.len() as i64;
        let stack = |f: fn(&BertExample) -> &[i64]| {
            let flat: Vec<i64> = examples.iter().flat_map(|e| f(e).iter().copied()).collect();
            Tensor::from_slice(&flat)
                .reshape([rows, -1])
                .to_device(device)
        };
        let nsp: Vec<i64> = examples.iter().map(|e| e.next_sentence_label).collect();
        BertBatch {
            input_ids: stack(|e| &e.input_ids),
            token_type_ids: stack(|e| &e.token_type_ids),
            attention_mask: stack(|e| &e.attention_mask),
            mlm_labels: stack(|e| &e.mlm_labels),
            nsp_labels: Tensor::from_slice(&nsp).to_device(device),
        }
    }

    pub fn inputs(&self) -> BertInputs<'_> {
        BertInputs {
            input_ids: &self.input_ids,
            token_type_ids: &self.token_type_ids,
            attention_mask: &self.attention_mask,
        }
    }
}

fn predicted(example: &BertExample) -> usize {
    example
        .mlm_labels
        .iter()
        .filter(|&&l| l != IGNORE_LABEL)
        .count()
}

impl Objective {
    /// The counts of a global step whose sequences are `step_ids` (all ranks' together).
    pub fn step_counts(
        &self,
        split: &TokenSplit,
        step_ids: &[u64],
        seq_len: usize,
    ) -> Result<StepCounts> {
        Ok(match self {
            Objective::CausalLm => StepCounts::Tokens((step_ids.len() * seq_len) as f64),
            Objective::MaskedLm(builder) => {
                let mut n = 0;
                for &i in step_ids {
                    n += predicted(&builder.example(split, i)?);
                }
                StepCounts::Bert {
                    predicted: n as f64,
                    pairs: step_ids.len() as f64,
                }
            }
        })
    }

    /// The loss of micro-batch `ids`, divided by the step's counts, ready for `backward`.
    #[allow(clippy::too_many_arguments)]
    pub fn micro_batch_loss(
        &self,
        model: &Model,
        split: &TokenSplit,
        ids: &[u64],
        seq_len: usize,
        counts: StepCounts,
        precision: Precision,
        device: Device,
    ) -> Result<Tensor> {
        match (self, model, counts) {
            (
                Objective::MaskedLm(builder),
                Model::Bert(bert),
                StepCounts::Bert { predicted, pairs },
            ) => {
                let batch = BertBatch::build(builder, split, ids, device)?;
                let sums = with_precision(precision, || {
                    bert.pretraining_sums(
                        &batch.inputs(),
                        &batch.mlm_labels,
                        &batch.nsp_labels,
                        true,
                    )
                });
                Ok(sums.mlm_loss / predicted.max(1.0) + sums.nsp_loss / pairs.max(1.0))
            }
            (Objective::CausalLm, _, StepCounts::Tokens(tokens)) => {
                let lm = causal(model);
                let (inputs, targets) = causal_batch(split, ids, seq_len, device)?;
                let loss = with_precision(precision, || {
                    lm.lm_loss_sum(&inputs, &targets, true).to_kind(Kind::Float)
                });
                Ok(loss / tokens)
            }
            _ => unreachable!("the engine pairs each model with its objective"),
        }
    }

    /// Held-out metrics over the first `n` sequences of `split`, in micro-batches of `micro`.
    #[allow(clippy::too_many_arguments)]
    pub fn evaluate(
        &self,
        model: &Model,
        split: &TokenSplit,
        n: u64,
        micro: usize,
        seq_len: usize,
        precision: Precision,
        device: Device,
    ) -> Result<EvalReport> {
        let indices: Vec<u64> = (0..n).collect();
        tch::no_grad(|| match (self, model) {
            (Objective::MaskedLm(builder), Model::Bert(bert)) => {
                evaluate_bert(bert, builder, split, &indices, micro, precision, device)
            }
            _ => {
                let lm = causal(model);
                let (mut total, mut count) = (0.0, 0.0);
                for chunk in indices.chunks(micro) {
                    let (inputs, targets) = causal_batch(split, chunk, seq_len, device)?;
                    let loss =
                        with_precision(precision, || lm.lm_loss_sum(&inputs, &targets, false));
                    total += loss.double_value(&[]);
                    count += targets.numel() as f64;
                }
                let loss = total / count;
                Ok(EvalReport {
                    loss,
                    perplexity: loss.exp(),
                    bert: None,
                })
            }
        })
    }
}

fn causal(model: &Model) -> &dyn CausalLm {
    model
        .as_causal()
        .expect("the engine pairs causal objectives with causal models")
}

fn evaluate_bert(
    bert: &Bert,
    builder: &PairBuilder,
    split: &TokenSplit,
    indices: &[u64],
    micro: usize,
    precision: Precision,
    device: Device,
) -> Result<EvalReport> {
    let (mut mlm_loss, mut nsp_loss, mut mlm_correct, mut nsp_correct) = (0.0, 0.0, 0i64, 0i64);
    let mut predicted = 0i64;
    for chunk in indices.chunks(micro) {
        let batch = BertBatch::build(builder, split, chunk, device)?;
        let sums = with_precision(precision, || {
            bert.pretraining_sums(&batch.inputs(), &batch.mlm_labels, &batch.nsp_labels, false)
        });
        mlm_loss += sums.mlm_loss.double_value(&[]);
        nsp_loss += sums.nsp_loss.double_value(&[]);
        mlm_correct += sums.mlm_correct.int64_value(&[]);
        nsp_correct += sums.nsp_correct.int64_value(&[]);
        predicted += sums.mlm_count;
    }
    let pairs = indices.len() as i64;
    let mlm = mlm_loss / predicted.max(1) as f64;
    let nsp = nsp_loss / pairs.max(1) as f64;
    Ok(EvalReport {
        loss: mlm + nsp,
        perplexity: mlm.exp(),
        bert: Some(BertEval {
            mlm_loss: mlm,
            nsp_loss: nsp,
            mlm_accuracy: mlm_correct as f64 / predicted.max(1) as f64,
            nsp_accuracy: nsp_correct as f64 / pairs.max(1) as f64,
            predicted_tokens: predicted,
            pairs,
        }),
    })
}
