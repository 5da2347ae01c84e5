//! ferry's training engine: models, the train loop, checkpoints and generation. Parallelism
//! (collectives, elastic membership) wraps this from outside.

pub mod bench;
pub mod checkpoint;
pub mod error;
pub mod finetune;
pub mod fsutil;
pub mod generate;
pub mod metrics;
pub mod models;
pub mod objective;
pub mod optim;
pub mod pretrained;
pub mod runtime;
pub use ferry_spec::sampler;
pub mod schedule;
pub mod train;
pub mod weights;

pub use error::{EngineError, Result};
