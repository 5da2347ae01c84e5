//! Text classification without libtorch: what fine-tuning on a labelled CSV needs around the
//! model.
//!
//! - [`csv`]: read a labelled CSV by header names into a [`LabelledSet`],
//! - [`split`]: a seeded stratified train/dev/test [`Split`], saved as `split.json`,

pub mod csv;
pub mod split;

pub use self::csv::{decode_html_entities, read_labelled_csv, Example, LabelledSet};
pub use split::{Part, Split, SplitFractions};
