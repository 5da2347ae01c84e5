//! ferry-common: the pieces shared by the ferry binaries. The data pipeline lives here:
//! corpus readers ([`corpus`]), tokenizer training ([`tokenizer`]), the on-disk token shard
//! format and its reader ([`shards`]), and the `prepare` step that ties them together
//! ([`prepare`]).

pub mod corpus;
pub mod error;
pub mod prepare;
pub mod shards;
pub mod tokenizer;

pub use error::DataError;
