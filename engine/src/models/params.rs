//! An ordered store of named trainable tensors.
//!
//! Models register their parameters here under the names `transformers` uses, so saving,
//! loading, optimizer state and (later) gradient bucketing all walk one list in one fixed
//! order. Creation order is part of determinism: the same seed gives the same weights.

use tch::{Device, Kind, Tensor};

pub struct ParamStore {
    device: Device,
    params: Vec<(String, Tensor)>,
}

impl ParamStore {
    pub fn new(device: Device) -> Self {
        ParamStore {
            device,
            params: Vec::new(),
        }
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Registers a tensor as a trainable leaf and returns a handle sharing its storage.
    pub fn register(&mut self, name: impl Into<String>, value: Tensor) -> Tensor {
        let leaf = value.detach().set_requires_grad(true);
        let handle = leaf.shallow_clone();
        self.params.push((name.into(), leaf));
        handle
    }

    pub fn normal(&mut self, name: impl Into<String>, shape: &[i64], std: f64) -> Tensor {
        let t = Tensor::randn(shape, (Kind::Float, self.device)) * std;
        self.register(name, t)
    }

    pub fn zeros(&mut self, name: impl Into<String>, shape: &[i64]) -> Tensor {
        self.register(name, Tensor::zeros(shape, (Kind::Float, self.device)))
    }

    pub fn ones(&mut self, name: impl Into<String>, shape: &[i64]) -> Tensor {
        self.register(name, Tensor::ones(shape, (Kind::Float, self.device)))
    }

    /// Another store of the same parameters: handles sharing their storage, gradients and
    /// autograd hooks, for code that works on them while the engine holds the store.
    pub fn clone_handles(&self) -> ParamStore {
        ParamStore {
            device: self.device,
            params: self
                .params
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect(),
        }
    }

    pub fn named(&self) -> &[(String, Tensor)] {
        &self.params
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.params.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    pub fn num_elements(&self) -> i64 {
        self.params.iter().map(|(_, t)| t.numel() as i64).sum()
    }

    pub fn zero_grad(&self) {
        for (_, p) in &self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }
}
