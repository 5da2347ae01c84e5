//! Text classification without libtorch: what fine-tuning on a labelled CSV needs around the
//! model.
//!
//! - [`csv`]: read a labelled CSV by header names into a [`LabelledSet`],

pub mod csv;

pub use self::csv::{decode_html_entities, read_labelled_csv, Example, LabelledSet};
