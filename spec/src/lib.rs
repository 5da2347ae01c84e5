//! What the coordinator and every worker must agree on: the job spec ([`job`]: the one schema,
//! its one validation, the one `ModelFamily`), the sample order every rank follows
//! ([`sampler`]), the step schedule every rank derives from it ([`schedule`]), and the layout
//! of a run directory ([`run_dir`]).

pub mod job;
pub mod run_dir;
pub mod sampler;
pub mod schedule;
