//! BERT (Devlin et al. 2019): a post-LayerNorm encoder over token + segment + position
//! embeddings, with the two pretraining heads: masked-LM (tied to the word embeddings) and
//! next-sentence prediction on the pooled [CLS] state.
//!
//! Parameter names and layouts are those of `transformers`' `BertForPreTraining`
//! (`bert.embeddings.word_embeddings`, `bert.encoder.layer.N.attention.self.query`,
//! `cls.predictions.transform.dense`, `cls.seq_relationship`; `nn.Linear` weights
//! [out, in]) and `Config` mirrors `BertConfig`, so checkpoints move both ways.

use super::layers::{embedding, Activation, LayerNorm, Linear};
use super::packing::Packing;
use super::params::ParamStore;
use crate::error::{EngineError, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// The fields of `transformers`' `BertConfig` that define the network.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Config {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub hidden_dropout_prob: f64,
    #[serde(default)]
    pub attention_probs_dropout_prob: f64,
    pub max_position_embeddings: i64,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: i64,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: Option<i64>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> i64 {
    2
}
fn default_init_range() -> f64 {
    0.02
}
fn default_eps() -> f64 {
    1e-12
}

/// Named sizes: (name, layers, hidden, heads). The small ones are Google's BERT miniatures
/// (Turc et al. 2019: Tiny L2/H128, Mini L4/H256, Small L4/H512, Medium L8/H512), then
/// BERT-Base and BERT-Large; every size has 64-wide heads, a 4H feed-forward and 512
/// positions.
const SIZES: &[(&str, i64, i64, i64)] = &[
    ("tiny", 2, 128, 2),
    ("mini", 4, 256, 4),
    ("small", 4, 512, 8),
    ("medium", 8, 512, 8),
    ("base", 12, 768, 12),
    ("large", 24, 1024, 16),
];

impl Config {
    /// A named size for a given vocabulary. Dropout is off by default, as for the other
    /// families (`--set hidden_dropout_prob=0.1` gives the paper's).
    pub fn sized(size: &str, vocab_size: i64) -> Result<Self> {
        let &(_, layers, hidden, heads) =
            SIZES
                .iter()
                .find(|s| s.0 == size)
                .ok_or_else(|| EngineError::UnknownSize {
                    family: "bert",
                    size: size.to_string(),
                    known: SIZES.iter().map(|s| s.0).collect::<Vec<_>>().join(", "),
                })?;
        Ok(Config {
            vocab_size,
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            intermediate_size: 4 * hidden,
            hidden_act: default_act(),
            hidden_dropout_prob: 0.0,
            attention_probs_dropout_prob: 0.0,
            max_position_embeddings: 512,
            type_vocab_size: default_type_vocab(),
            initializer_range: default_init_range(),
            layer_norm_eps: default_eps(),
            pad_token_id: Some(0),
        })
    }

    pub fn validate(&self) -> Result<()> {
        super::check_positive(&[
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ])?;
        super::check_heads(
            "num_attention_heads",
            self.hidden_size,
            self.num_attention_heads,
        )?;
        super::check_dropout(&[
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
            ),
        ])?;
        if Activation::from_hf(&self.hidden_act).is_none() {
            return Err(EngineError::Config {
                field: "hidden_act".into(),
                message: format!(
                    "`{}` is not supported (gelu, gelu_new, relu)",
                    self.hidden_act
                ),
            });
        }
        Ok(())
    }

    /// `config.json` as `transformers` writes it for `BertForPreTraining`.
    pub fn to_hf_json(&self) -> serde_json::Value {
        super::hf_config_json(
            self,
            "BertForPreTraining",
            "bert",
            [("position_embedding_type", "absolute".into())],
        )
    }

    /// Training FLOPs per token: 6N + 12·L·d·T, N without the embeddings. The MLM head runs
    /// only on the chosen ~15% of positions, so its tied d × V projection is not counted.
    pub fn flops_per_token(&self, seq_len: i64, params_non_embedding: i64) -> f64 {
        (6 * params_non_embedding + 12 * self.num_hidden_layers * self.hidden_size * seq_len) as f64
    }
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_ln: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_ln: LayerNorm,
}

/// Inputs of a batch of BERT examples, all [batch, time] int64.
pub struct BertInputs<'a> {
    pub input_ids: &'a Tensor,
    pub token_type_ids: &'a Tensor,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: &'a Tensor,
}

/// Sums over a batch from the two pretraining heads: losses to back-propagate and counts for
/// accuracies. Sums, not means, so that callers divide by the step's global counts.
pub struct PretrainingSums {
    pub mlm_loss: Tensor,
    pub nsp_loss: Tensor,
    pub mlm_correct: Tensor,
    pub mlm_count: i64,
    pub nsp_correct: Tensor,
}

/// `BertForPreTraining`'s two heads (`cls.*`); a model built for fine-tuning has none.
struct PretrainingHeads {
    mlm_transform: Linear,
    mlm_ln: LayerNorm,
    mlm_bias: Tensor,
    seq_relationship: Linear,
}

pub struct Bert {
    pub config: Config,
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    embeddings_ln: LayerNorm,
    layers: Vec<Layer>,
    pooler: Linear,
    heads: Option<PretrainingHeads>,
    activation: Activation,
}

impl Bert {
    /// Builds `BertForPreTraining` with BERT's initialisation: N(0, 0.02) weights and
    /// embeddings, zero biases, unit LayerNorm gains, the padding row of the word embeddings
    /// zero (as `nn.Embedding(padding_idx=...)` initialises it).
    pub fn new(ps: &mut ParamStore, config: &Config) -> Result<Self> {
        Bert::build(ps, config, true)
    }

    /// The encoder and pooler only (`BertModel`), as sequence classification uses them.
    pub fn encoder_only(ps: &mut ParamStore, config: &Config) -> Result<Self> {
        Bert::build(ps, config, false)
    }

    fn build(ps: &mut ParamStore, config: &Config, with_heads: bool) -> Result<Self> {
        config.validate()?;
        let c = config;
        let std = c.initializer_range;
        let (d, eps) = (c.hidden_size, c.layer_norm_eps);
        let word_embeddings = embedding(
            ps,
            "bert.embeddings.word_embeddings.weight",
            c.vocab_size,
            d,
            std,
        );
        if let Some(pad) = c.pad_token_id.filter(|&p| (0..c.vocab_size).contains(&p)) {
            tch::no_grad(|| {
                let _ = word_embeddings.get(pad).zero_();
            });
        }
        let position_embeddings = embedding(
            ps,
            "bert.embeddings.position_embeddings.weight",
            c.max_position_embeddings,
            d,
            std,
        );
        let token_type_embeddings = embedding(
            ps,
            "bert.embeddings.token_type_embeddings.weight",
            c.type_vocab_size,
            d,
            std,
        );
        let embeddings_ln = LayerNorm::new(ps, "bert.embeddings.LayerNorm", d, eps);
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let p = format!("bert.encoder.layer.{i}");
                let lin = |ps: &mut ParamStore, name: &str, n_in, n_out| {
                    Linear::new(ps, &format!("{p}.{name}"), n_in, n_out, std, true)
                };
                Layer {
                    query: lin(ps, "attention.self.query", d, d),
                    key: lin(ps, "attention.self.key", d, d),
                    value: lin(ps, "attention.self.value", d, d),
                    attn_out: lin(ps, "attention.output.dense", d, d),
                    attn_ln: LayerNorm::new(ps, &format!("{p}.attention.output.LayerNorm"), d, eps),
                    intermediate: lin(ps, "intermediate.dense", d, c.intermediate_size),
                    output: lin(ps, "output.dense", c.intermediate_size, d),
                    output_ln: LayerNorm::new(ps, &format!("{p}.output.LayerNorm"), d, eps),
                }
            })
            .collect();
        let pooler = Linear::new(ps, "bert.pooler.dense", d, d, std, true);
        let heads = with_heads.then(|| PretrainingHeads {
            mlm_transform: Linear::new(ps, "cls.predictions.transform.dense", d, d, std, true),
            mlm_ln: LayerNorm::new(ps, "cls.predictions.transform.LayerNorm", d, eps),
            mlm_bias: ps.zeros("cls.predictions.bias", &[c.vocab_size]),
            seq_relationship: Linear::new(ps, "cls.seq_relationship", d, 2, std, true),
        });
        Ok(Bert {
            activation: Activation::from_hf(&c.hidden_act).expect("validated"),
            config: c.clone(),
            word_embeddings,
            position_embeddings,
            token_type_embeddings,
            embeddings_ln,
            layers,
            pooler,
            heads,
        })
    }

    /// Parameters that are not embeddings (for FLOP accounting).
    pub fn non_embedding_params(&self, ps: &ParamStore) -> i64 {
        ps.num_elements()
            - [
                &self.word_embeddings,
                &self.position_embeddings,
                &self.token_type_embeddings,
            ]
            .iter()
            .map(|t| t.numel() as i64)
            .sum::<i64>()
    }

    /// The encoder's last hidden states [batch, time, hidden] at every position, padding
    /// included, as `BertModel` returns them.
    pub fn encode(&self, inputs: &BertInputs, train: bool) -> Tensor {
        let (b, t) = inputs
            .input_ids
            .size2()
            .expect("input_ids must be [batch, time]");
        self.encode_packed(inputs, &Packing::full(b, t), train)
    }

    /// The same at the real tokens, and zeros at the padding: the position-wise layers run
    /// on the real tokens only ([`Packing`]), for callers that read no padding position.
    pub fn encode_real(&self, inputs: &BertInputs, train: bool) -> Tensor {
        self.encode_packed(inputs, &Packing::new(inputs.attention_mask), train)
    }

    /// Attention runs on the padded batch with padding keys masked out, the rest on the
    /// positions `packing` keeps.
    fn encode_packed(&self, inputs: &BertInputs, packing: &Packing, train: bool) -> Tensor {
        let c = &self.config;
        let (b, t) = inputs
            .input_ids
            .size2()
            .expect("input_ids must be [batch, time]");
        let embed = |table: &Tensor, ids: &Tensor| Tensor::embedding(table, ids, -1, false, false);
        let emb = embed(&self.word_embeddings, &packing.pack(inputs.input_ids))
            + embed(
                &self.token_type_embeddings,
                &packing.pack(inputs.token_type_ids),
            )
            + embed(
                &self.position_embeddings,
                &packing.positions(inputs.input_ids.device()),
            );
        // [tokens, hidden] from here on, except inside attention.
        let mut x = self
            .embeddings_ln
            .forward(&emb)
            .dropout(c.hidden_dropout_prob, train);
        // Keys that are padding take no part in attention: [batch, 1, 1, time], true = attend.
        let keep = inputs.attention_mask.ne(0).reshape([b, 1, 1, t]);
        let (h, hd) = (c.num_attention_heads, c.hidden_size / c.num_attention_heads);
        let attn_p = if train {
            c.attention_probs_dropout_prob
        } else {
            0.0
        };
        for layer in &self.layers {
            let qkv = Tensor::cat(
                &[
                    layer.query.forward(&x),
                    layer.key.forward(&x),
                    layer.value.forward(&x),
                ],
                1,
            );
            let heads = packing
                .unpack(&qkv)
                .reshape([b, t, 3, h, hd])
                .permute([2, 0, 3, 1, 4]);
            let a = Tensor::scaled_dot_product_attention(
                &heads.get(0),
                &heads.get(1),
                &heads.get(2),
                Some(&keep),
                attn_p,
                false,
                None,
                false,
            )
            .transpose(1, 2);
            let a = packing.pack(&a.reshape([b, t, c.hidden_size]));
            let a = layer
                .attn_out
                .forward(&a)
                .dropout(c.hidden_dropout_prob, train);
            let x1 = layer.attn_ln.forward(&(a + &x));
            let m = layer
                .output
                .forward(&self.activation.apply(&layer.intermediate.forward(&x1)))
                .dropout(c.hidden_dropout_prob, train);
            x = layer.output_ln.forward(&(m + x1));
        }
        packing.unpack(&x)
    }

    /// tanh(W · h[CLS] + b): [batch, hidden].
    pub fn pooled(&self, hidden: &Tensor) -> Tensor {
        self.pooler.forward(&hidden.select(1, 0)).tanh()
    }

    fn heads(&self) -> &PretrainingHeads {
        self.heads
            .as_ref()
            .expect("pretraining heads are only used on models built with them")
    }

    /// Masked-LM logits for hidden states [..., hidden] -> [..., vocab].
    pub fn mlm_logits(&self, hidden: &Tensor) -> Tensor {
        let heads = self.heads();
        let h = heads
            .mlm_ln
            .forward(&self.activation.apply(&heads.mlm_transform.forward(hidden)));
        h.matmul(&self.word_embeddings.tr()) + &heads.mlm_bias
    }

    /// Next-sentence logits for pooled states [batch, hidden] -> [batch, 2].
    pub fn nsp_logits(&self, pooled: &Tensor) -> Tensor {
        self.heads().seq_relationship.forward(pooled)
    }

    /// Both heads' logits for every position, as `BertForPreTraining` returns them
    /// (`prediction_logits` [batch, time, vocab], `seq_relationship_logits` [batch, 2]).
    pub fn pretraining_logits(&self, inputs: &BertInputs) -> (Tensor, Tensor) {
        let hidden = self.encode(inputs, false);
        (
            self.mlm_logits(&hidden),
            self.nsp_logits(&self.pooled(&hidden)),
        )
    }

    /// Loss sums and correct counts of both heads. The MLM head runs only at the positions
    /// with a label (not -100): the same loss as over every position, at a fraction of the
    /// d × V projection's cost.
    pub fn pretraining_sums(
        &self,
        inputs: &BertInputs,
        mlm_labels: &Tensor,
        nsp_labels: &Tensor,
        train: bool,
    ) -> PretrainingSums {
        // Labels and [CLS] are real tokens: padding positions are never read.
        let hidden = self.encode_real(inputs, train);
        let d = self.config.hidden_size;
        let labels = mlm_labels.reshape([-1]);
        let chosen = labels.ne(-100).nonzero().squeeze_dim(1);
        let targets = labels.index_select(0, &chosen);
        let picked = hidden.reshape([-1, d]).index_select(0, &chosen);
        let mlm = self.mlm_logits(&picked);
        let nsp = self.nsp_logits(&self.pooled(&hidden));
        let ce = |logits: &Tensor, y: &Tensor| {
            logits.to_kind(Kind::Float).cross_entropy_loss::<Tensor>(
                y,
                None,
                tch::Reduction::Sum,
                -100,
                0.0,
            )
        };
        let correct = |logits: &Tensor, y: &Tensor| {
            logits
                .argmax(-1, false)
                .eq_tensor(y)
                .sum(Kind::Int64)
                .detach()
        };
        PretrainingSums {
            mlm_loss: ce(&mlm, &targets),
            nsp_loss: ce(&nsp, nsp_labels),
            mlm_correct: correct(&mlm, &targets),
            mlm_count: targets.numel() as i64,
            nsp_correct: correct(&nsp, nsp_labels),
        }
    }
}
