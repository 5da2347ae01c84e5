//! One file per model family, like candle-transformers.
pub mod gpt2;
pub mod layers;
pub mod overrides;
pub mod params;

pub use params::ParamStore;
