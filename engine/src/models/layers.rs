//! Building blocks shared by the model files: GPT-2's `Conv1D` (a linear layer whose weight
//! is stored [in, out]), LayerNorm and embeddings, registered under `transformers` names.

use super::params::ParamStore;
use tch::Tensor;

/// `transformers`' Conv1D: y = x W + b with W stored as [in, out].
pub struct Conv1D {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Conv1D {
    pub fn new(ps: &mut ParamStore, prefix: &str, n_in: i64, n_out: i64, std: f64) -> Self {
        Conv1D {
            weight: ps.normal(format!("{prefix}.weight"), &[n_in, n_out], std),
            bias: ps.zeros(format!("{prefix}.bias"), &[n_out]),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        let n_in = size[size.len() - 1];
        let mut out_shape = size.clone();
        let n_out = self.weight.size()[1];
        *out_shape.last_mut().expect("non-empty shape") = n_out;
        self.bias
            .addmm(&x.reshape([-1, n_in]), &self.weight)
            .reshape(out_shape)
    }
}

/// A linear layer stored as `torch.nn.Linear` stores it: weight [out, in].
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(
        ps: &mut ParamStore,
        prefix: &str,
        n_in: i64,
        n_out: i64,
        std: f64,
        bias: bool,
    ) -> Self {
        Linear {
            weight: ps.normal(format!("{prefix}.weight"), &[n_out, n_in], std),
            bias: bias.then(|| ps.zeros(format!("{prefix}.bias"), &[n_out])),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    eps: f64,
    dim: i64,
}

impl LayerNorm {
    pub fn new(ps: &mut ParamStore, prefix: &str, dim: i64, eps: f64) -> Self {
        LayerNorm {
            weight: ps.ones(format!("{prefix}.weight"), &[dim]),
            bias: ps.zeros(format!("{prefix}.bias"), &[dim]),
            eps,
            dim,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm(
            [self.dim],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}

pub fn embedding(ps: &mut ParamStore, name: &str, rows: i64, dim: i64, std: f64) -> Tensor {
    ps.normal(name, &[rows, dim], std)
}

/// The activations `transformers` configs name.
#[derive(Clone, Copy, Debug)]
pub enum Activation {
    /// `gelu_new` / `gelu_pytorch_tanh`: GPT-2's tanh approximation.
    GeluTanh,
    /// `gelu`: the exact erf form.
    Gelu,
    Relu,
}

impl Activation {
    pub fn from_hf(name: &str) -> Option<Self> {
        match name {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Activation::GeluTanh),
            "gelu" => Some(Activation::Gelu),
            "relu" => Some(Activation::Relu),
            _ => None,
        }
    }

    pub fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Activation::GeluTanh => x.gelu("tanh"),
            Activation::Gelu => x.gelu("none"),
            Activation::Relu => x.relu(),
        }
    }
}
