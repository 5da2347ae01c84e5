//! ferry-common: the pieces shared by the ferry binaries. The data pipeline lives here:
//! corpus readers ([`corpus`]), tokenizer training ([`tokenizer`]), the on-disk token shard
//! format and its reader ([`shards`]), and the `prepare` step that ties them together
//! ([`prepare`]). So do the job spec ([`job`]), the sample order every worker follows
//! ([`sampler`]) and the layout of a run directory ([`run_dir`]). The coordinator's protocol
//! is `ferry-rpc`'s. Fine-tuning's model-free half, labelled CSV, split, metrics, report picture and
//! learning-rate recipes, is [`textcls`].

pub mod corpus;
pub mod error;
pub mod job;
pub mod prepare;
pub mod run_dir;
pub mod sampler;
pub mod sentence_pairs;
pub mod shards;
pub mod textcls;
pub mod tokenizer;

pub use error::DataError;
