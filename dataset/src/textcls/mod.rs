//! Text classification without libtorch: what fine-tuning on a labelled CSV needs around the
//! model.
//!
//! - [`csv`]: read a labelled CSV by header names into a [`LabelledSet`],
//! - [`split`]: a seeded stratified train/dev/test [`Split`], saved as `split.json`,
//! - [`metrics`]: confusion matrix, accuracy, macro-F1 and per-class scores ([`Metrics`]),
//! - [`report_svg`]: the report's picture (confusion heatmaps and training curves),
//! - [`recipe`]: learning-rate schedules, discriminative rates, gradual unfreezing and early
//!   stopping from ULMFiT and BERT, as pure functions.

pub mod csv;
pub mod metrics;
pub mod recipe;
pub mod report_svg;
pub mod split;

pub use self::csv::{
    decode_html_entities, read_labelled_csv, read_labelled_csv_encoded, CsvEncoding, Example,
    LabelledSet,
};
pub use metrics::{ClassMetrics, ConfusionMatrix, Metrics, MetricsError};
pub use recipe::{EarlyStopping, SlantedTriangular, Verdict};
pub use report_svg::{render_report_svg, NamedConfusion, ReportSeries};
pub use split::{Part, Split, SplitFractions};
