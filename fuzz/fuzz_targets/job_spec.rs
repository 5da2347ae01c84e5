//! The job spec: arbitrary text parsed and validated as a job TOML (`JobSpec::from_toml`, what
//! `ferry launch`, the coordinator and every worker read). Nothing may panic; an error is one
//! line; a valid spec serialises, reads back the same, and gives the coordinator usable
//! timings and worker counts.

#![no_main]

use ferry_spec::job::{JobSpec, JobSpecError};
use ferry_coordinator::state::Timing;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let spec = match JobSpec::from_toml(text, "job.toml") {
        Ok(spec) => spec,
        Err(e) => {
            let message = e.to_string();
            ferry_fuzz::debug(&message);
            assert!(!message.contains('\n'), "a multi-line error: {message:?}");
            assert!(matches!(e, JobSpecError::Invalid { .. }));
            return;
        }
    };
    let again = spec.to_toml();
    let reread = JobSpec::from_toml(&again, "again.toml")
        .unwrap_or_else(|e| panic!("a valid spec does not read back: {e}\n{again}"));
    assert_eq!(reread.to_toml(), again, "the spec changed on the way");

    assert!(spec.micro_batches() >= 1);
    let max = spec.max_workers();
    assert!(max >= spec.cluster.min_workers);
    assert!(u64::from(max) <= spec.micro_batches());
    let _ = spec.override_strings();
    let timing = Timing::from_spec(&spec);
    assert!(timing.heartbeat_interval < timing.heartbeat_timeout);
});
