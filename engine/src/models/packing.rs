//! Running the position-wise layers on real tokens only.
//!
//! A batch of texts is padded to its longest row, and on tweets about 40% of the padded
//! positions are padding. Everything in a transformer block except attention works on each
//! position alone (linear layers, LayerNorm, the activation, dropout), so those run on the
//! real tokens packed into [tokens, width]; only attention sees the padded [batch, time] shape,
//! with its padding mask as before. The real tokens' values are those of the padded
//! computation; the padding positions come back as zeros instead of values nothing reads.

use tch::{Kind, Tensor};

pub struct Packing {
    /// Flat indices (into batch × time) of the real tokens, in order; `None` when every
    /// position is real, in which case packing is only a reshape.
    real: Option<Tensor>,
    batch: i64,
    time: i64,
}

impl Packing {
    /// `mask` [batch, time]: non-zero for real tokens.
    pub fn new(mask: &Tensor) -> Packing {
        let (batch, time) = mask.size2().expect("mask must be [batch, time]");
        let real = mask.reshape([-1]).ne(0).nonzero().squeeze_dim(1);
        // One pass over the mask: the indices' count says whether anything is padding.
        let real = (real.size()[0] < batch * time).then_some(real);
        Packing { real, batch, time }
    }

    /// Every position is real.
    pub fn full(batch: i64, time: i64) -> Packing {
        Packing {
            real: None,
            batch,
            time,
        }
    }

    /// The position (0-based, within its row) of every kept token: [tokens].
    pub fn positions(&self, device: tch::Device) -> Tensor {
        let positions = Tensor::arange(self.time, (Kind::Int64, device))
            .unsqueeze(0)
            .expand([self.batch, self.time], false);
        self.pack(&positions)
    }

    /// [batch, time, ...] -> [tokens, ...].
    pub fn pack(&self, x: &Tensor) -> Tensor {
        let mut shape = x.size();
        let rest = shape.split_off(2);
        let flat = x.reshape([&[self.batch * self.time][..], &rest].concat());
        match &self.real {
            Some(real) => flat.index_select(0, real),
            None => flat,
        }
    }

    /// [tokens, ...] -> [batch, time, ...], zeros at the padding.
    pub fn unpack(&self, x: &Tensor) -> Tensor {
        let rest = x.size()[1..].to_vec();
        let shape = [&[self.batch, self.time][..], &rest].concat();
        match &self.real {
            Some(real) => {
                let full = [&[self.batch * self.time][..], &rest].concat();
                x.new_zeros(full, (x.kind(), x.device()))
                    .index_copy(0, real, x)
                    .reshape(shape)
            }
            None => x.reshape(shape),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_keeps_the_real_tokens_in_order_and_unpacking_puts_them_back() {
        let mask = Tensor::from_slice(&[1i64, 1, 0, 1, 1, 1]).reshape([2, 3]);
        let x = Tensor::arange(12, (Kind::Float, tch::Device::Cpu)).reshape([2, 3, 2]);
        let p = Packing::new(&mask);
        let packed = p.pack(&x);
        assert_eq!(packed.size(), [5, 2]);
        let got: Vec<f32> = Vec::try_from(packed.reshape([-1])).unwrap();
        assert_eq!(got, [0., 1., 2., 3., 6., 7., 8., 9., 10., 11.]);
        let back: Vec<f32> = Vec::try_from(p.unpack(&packed).reshape([-1])).unwrap();
        assert_eq!(back, [0., 1., 2., 3., 0., 0., 6., 7., 8., 9., 10., 11.]);

        let full = Packing::new(&mask.ones_like());
        assert!(full.real.is_none());
        assert_eq!(full.pack(&x).size(), [6, 2]);
        assert!(full.unpack(&full.pack(&x)).equal(&x));
    }

    #[test]
    fn gradients_flow_to_the_real_tokens_only() {
        let mask = Tensor::from_slice(&[1i64, 0, 1, 1]).reshape([2, 2]);
        let x = Tensor::ones([2, 2, 3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let p = Packing::new(&mask);
        p.unpack(&(p.pack(&x) * 2.0)).sum(Kind::Float).backward();
        let g: Vec<f32> = Vec::try_from(
            x.grad()
                .sum_dim_intlist([2i64].as_slice(), false, Kind::Float)
                .reshape([-1]),
        )
        .unwrap();
        assert_eq!(g, [6., 0., 6., 6.]);
    }
}
