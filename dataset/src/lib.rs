//! ferry-dataset: the data pipeline. Corpus readers ([`corpus`]), tokenizer training
//! ([`tokenizer`]), the on-disk token shard format and its reader ([`shards`]), the `prepare`
//! step that ties them together ([`prepare`]), and BERT's sentence pairs and masking
//! ([`sentence_pairs`]). Fine-tuning's model-free half, labelled CSV, split, metrics, report
//! picture and learning-rate recipes, is [`textcls`]. What coordinator and workers agree on
//! (job spec, sample order) is `ferry-spec`'s; the coordinator's protocol is `ferry-rpc`'s.

pub mod corpus;
pub mod error;
pub mod prepare;
pub mod sentence_pairs;
pub mod shards;
pub mod textcls;
pub mod tokenizer;

pub use error::DataError;
