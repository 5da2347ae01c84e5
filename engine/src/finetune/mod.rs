//! Fine-tuning a pretrained checkpoint on a labelled text-classification task, on one node:
//! the classifier heads in `transformers`' layouts ([`classifier`]), texts to ids
//! ([`encode`]), the training loop and report ([`run`]), the saved model ([`saved`]) and
//! prediction ([`predict`]).
mod checks;
pub mod classifier;
pub mod cli;
pub mod encode;
pub mod predict;
pub mod run;
pub mod saved;
