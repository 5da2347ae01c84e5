//! GPT-2 (Radford et al. 2019): pre-LayerNorm decoder, learned positions, tied embeddings.
//!
//! Parameter names and layouts are those of `transformers`' `GPT2LMHeadModel` (Conv1D weights
//! [in, out]) and `Config` mirrors its `config.json`, so checkpoints move both ways. The model
//! knows nothing about parallelism or training; it maps token ids to logits.

use super::layers::{embedding, Activation, Conv1D, LayerNorm};
use super::packing::Packing;
use super::params::ParamStore;
use crate::error::{EngineError, Result};
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// The fields of `transformers`' `GPT2Config` that define the network.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Config {
    pub vocab_size: i64,
    pub n_positions: i64,
    pub n_embd: i64,
    pub n_layer: i64,
    pub n_head: i64,
    #[serde(default)]
    pub n_inner: Option<i64>,
    #[serde(default = "default_activation")]
    pub activation_function: String,
    #[serde(default)]
    pub resid_pdrop: f64,
    #[serde(default)]
    pub embd_pdrop: f64,
    #[serde(default)]
    pub attn_pdrop: f64,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    #[serde(default)]
    pub bos_token_id: Option<i64>,
    #[serde(default)]
    pub eos_token_id: Option<i64>,
}

fn default_activation() -> String {
    "gelu_new".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_init_range() -> f64 {
    0.02
}

/// Named sizes: (name, layers, width, heads, context).
const SIZES: &[(&str, i64, i64, i64, i64)] = &[
    ("tiny", 2, 128, 4, 256),
    ("mini", 4, 256, 4, 256),
    ("small", 6, 384, 6, 256),
    ("base", 12, 768, 12, 1024),
    ("medium", 24, 1024, 16, 1024),
    ("large", 36, 1280, 20, 1024),
];

impl Config {
    /// A named size for a given vocabulary. Dropout is off by default: with data this small
    /// per step the regulariser costs more than it buys, and it keeps benchmarks comparable.
    pub fn sized(size: &str, vocab_size: i64) -> Result<Self> {
        let &(_, n_layer, n_embd, n_head, n_positions) = SIZES
            .iter()
            .find(|s| s.0 == size)
            .ok_or_else(|| EngineError::UnknownSize {
                family: "gpt2",
                size: size.to_string(),
                known: SIZES.iter().map(|s| s.0).collect::<Vec<_>>().join(", "),
            })?;
        Ok(Config {
            vocab_size,
            n_positions,
            n_embd,
            n_layer,
            n_head,
            n_inner: None,
            activation_function: default_activation(),
            resid_pdrop: 0.0,
            embd_pdrop: 0.0,
            attn_pdrop: 0.0,
            layer_norm_epsilon: default_eps(),
            initializer_range: default_init_range(),
            bos_token_id: None,
            eos_token_id: None,
        })
    }

    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
        ];
        for (field, v) in positive {
            if v <= 0 {
                return Err(EngineError::Config {
                    field: field.into(),
                    message: format!("must be positive, got {v}"),
                });
            }
        }
        if self.n_embd % self.n_head != 0 {
            return Err(EngineError::Config {
                field: "n_head".into(),
                message: format!(
                    "n_embd ({}) must be divisible by n_head ({})",
                    self.n_embd, self.n_head
                ),
            });
        }
        super::check_dropout(&[
            ("resid_pdrop", self.resid_pdrop),
            ("embd_pdrop", self.embd_pdrop),
            ("attn_pdrop", self.attn_pdrop),
        ])?;
        if Activation::from_hf(&self.activation_function).is_none() {
            return Err(EngineError::Config {
                field: "activation_function".into(),
                message: format!(
                    "`{}` is not supported (gelu_new, gelu, relu)",
                    self.activation_function
                ),
            });
        }
        Ok(())
    }

    pub fn inner_dim(&self) -> i64 {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    /// `config.json` as `transformers` writes it for `GPT2LMHeadModel`.
    pub fn to_hf_json(&self) -> serde_json::Value {
        super::hf_config_json(
            self,
            "GPT2LMHeadModel",
            "gpt2",
            [
                ("n_ctx", self.n_positions.into()),
                ("scale_attn_weights", true.into()),
                ("use_cache", true.into()),
            ],
        )
    }

    /// Training FLOPs per token, forward and backward (Kaplan et al.: 6N + 12·L·d·T, N without
    /// the embeddings), the convention of the PyTorch reference benchmark.
    pub fn flops_per_token(&self, seq_len: i64, params_non_embedding: i64) -> f64 {
        (6 * params_non_embedding + 12 * self.n_layer * self.n_embd * seq_len) as f64
    }
}

struct Block {
    ln_1: LayerNorm,
    c_attn: Conv1D,
    attn_proj: Conv1D,
    ln_2: LayerNorm,
    c_fc: Conv1D,
    mlp_proj: Conv1D,
}

pub struct Gpt2 {
    pub config: Config,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    activation: Activation,
}

impl Gpt2 {
    /// Builds the model with GPT-2's initialisation: N(0, 0.02) weights, zero biases, unit
    /// LayerNorm gains, and the residual output projections scaled by 1/sqrt(2·n_layer).
    pub fn new(ps: &mut ParamStore, config: &Config) -> Result<Self> {
        config.validate()?;
        let c = config;
        let std = c.initializer_range;
        let proj_std = std / ((2 * c.n_layer) as f64).sqrt();
        let (d, inner, eps) = (c.n_embd, c.inner_dim(), c.layer_norm_epsilon);
        let wte = embedding(ps, "transformer.wte.weight", c.vocab_size, d, std);
        let wpe = embedding(ps, "transformer.wpe.weight", c.n_positions, d, std);
        let blocks = (0..c.n_layer)
            .map(|i| {
                let p = format!("transformer.h.{i}");
                Block {
                    ln_1: LayerNorm::new(ps, &format!("{p}.ln_1"), d, eps),
                    c_attn: Conv1D::new(ps, &format!("{p}.attn.c_attn"), d, 3 * d, std),
                    attn_proj: Conv1D::new(ps, &format!("{p}.attn.c_proj"), d, d, proj_std),
                    ln_2: LayerNorm::new(ps, &format!("{p}.ln_2"), d, eps),
                    c_fc: Conv1D::new(ps, &format!("{p}.mlp.c_fc"), d, inner, std),
                    mlp_proj: Conv1D::new(ps, &format!("{p}.mlp.c_proj"), inner, d, proj_std),
                }
            })
            .collect();
        let ln_f = LayerNorm::new(ps, "transformer.ln_f", d, eps);
        let activation = Activation::from_hf(&c.activation_function).expect("validated");
        Ok(Gpt2 {
            config: c.clone(),
            wte,
            wpe,
            blocks,
            ln_f,
            activation,
        })
    }

    /// Parameters that are not embeddings (for FLOP accounting).
    pub fn non_embedding_params(&self, ps: &ParamStore) -> i64 {
        ps.num_elements() - self.wte.numel() as i64 - self.wpe.numel() as i64
    }

    /// Final hidden states [batch, time, n_embd] for token ids [batch, time]. With an
    /// `attention_mask` (1 real, 0 padding after the text), the position-wise layers run on
    /// the real tokens only ([`Packing`]) and padding positions come back as zeros.
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Tensor {
        let c = &self.config;
        let (b, t) = input_ids.size2().expect("input_ids must be [batch, time]");
        let packing = attention_mask.map_or(Packing::full(b, t), Packing::new);
        let positions = packing.positions(input_ids.device());
        // [tokens, n_embd] from here on, except inside attention.
        let mut x = (Tensor::embedding(&self.wte, &packing.pack(input_ids), -1, false, false)
            + Tensor::embedding(&self.wpe, &positions, -1, false, false))
        .dropout(c.embd_pdrop, train);
        let (h, hd) = (c.n_head, c.n_embd / c.n_head);
        let attn_p = if train { c.attn_pdrop } else { 0.0 };
        for blk in &self.blocks {
            let qkv = packing.unpack(&blk.c_attn.forward(&blk.ln_1.forward(&x)));
            let heads = qkv.reshape([b, t, 3, h, hd]).permute([2, 0, 3, 1, 4]);
            let (q, k, v) = (heads.get(0), heads.get(1), heads.get(2));
            let a = Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                None::<Tensor>,
                attn_p,
                true,
                None,
                false,
            );
            let a = packing.pack(&a.transpose(1, 2).reshape([b, t, c.n_embd]));
            x = x + blk.attn_proj.forward(&a).dropout(c.resid_pdrop, train);
            let m = self
                .activation
                .apply(&blk.c_fc.forward(&blk.ln_2.forward(&x)));
            x = x + blk.mlp_proj.forward(&m).dropout(c.resid_pdrop, train);
        }
        packing.unpack(&self.ln_f.forward(&x))
    }

    /// Logits [batch, time, vocab] through the head tied to the token embedding.
    pub fn logits(&self, input_ids: &Tensor) -> Tensor {
        self.hidden_states(input_ids, None, false)
            .matmul(&self.wte.tr())
    }

    /// Sum of next-token cross-entropy over every position (targets [batch, time]). A sum,
    /// not a mean, so that callers can divide by the step's global token count.
    pub fn lm_loss_sum(&self, input_ids: &Tensor, targets: &Tensor, train: bool) -> Tensor {
        let logits = self
            .hidden_states(input_ids, None, train)
            .matmul(&self.wte.tr());
        super::token_cross_entropy_sum(&logits, targets)
    }
}

impl Gpt2 {
    pub fn wte_device(&self) -> tch::Device {
        self.wte.device()
    }
}
