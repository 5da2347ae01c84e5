use super::*;

pub const MINIMAL: &str = r#"
[job]
name = "t"
steps = 20
run_dir = "runs/t"

[model]
family = "gpt2"
size = "tiny"

[data]
shards = "data"
seq_len = 64

[batch]
global = 16
micro = 4
"#;

#[test]
fn minimal_spec_gets_defaults_and_round_trips() {
    let spec = JobSpec::from_toml(MINIMAL, "job.toml").unwrap();
    assert_eq!(spec.max_workers(), 4);
    assert_eq!(spec.optimizer.decay, Decay::Cosine);
    let again = JobSpec::from_toml(&spec.to_toml(), "again.toml").unwrap();
    assert_eq!(spec, again);
}

fn error_of(text: &str) -> String {
    JobSpec::from_toml(text, "job.toml")
        .unwrap_err()
        .to_string()
}

#[test]
fn dropout_overrides_outside_0_1_are_refused() {
    let with = |o: &str| MINIMAL.replace("[data]", &format!("[model.overrides]\n{o}\n\n[data]"));
    for bad in [
        "resid_pdrop = 1.5",
        "hidden_dropout_prob = -0.1",
        "attn_pdrop = 1",
    ] {
        let e = error_of(&with(bad));
        let key = bad.split(' ').next().unwrap();
        assert!(
            e.starts_with(&format!("job.toml:12: model.overrides.{key}: ")),
            "{e}"
        );
    }
    JobSpec::from_toml(&with("resid_pdrop = 0.1\nembd_pdrop = 0"), "job.toml").unwrap();
}

/// Found by the job_spec fuzz target: overrides written as nested tables were accepted, and
/// the spec then did not read back from the TOML the coordinator hands to workers ("invalid
/// table header recursion limit exceeded"). An override is one plain field.
#[test]
fn overrides_that_are_tables_or_arrays_are_refused() {
    let with = |o: &str| MINIMAL.replace("[data]", &format!("{o}\n\n[data]"));
    for (bad, kind) in [
        ("[model.overrides.a.b.c]\nx = 1", "table"),
        ("[model.overrides]\nn_layer = [2, 3]", "array"),
    ] {
        let e = error_of(&with(bad));
        assert!(e.contains("model.overrides.") && e.contains(kind), "{e}");
    }
    let ok = with("[model.overrides]\nn_layer = 2\nactivation_function = \"gelu\"");
    JobSpec::from_toml(&ok, "job.toml").unwrap();
}

#[test]
fn errors_name_line_field_and_allowed_values() {
    let e = error_of(&MINIMAL.replace("family = \"gpt2\"", "family = \"gpt5\""));
    assert!(e.starts_with("job.toml:8:"), "{e}");
    assert!(e.contains("model.family") && e.contains("gpt2"), "{e}");

    let e = error_of(&MINIMAL.replace("micro = 4", "micro = 5"));
    assert_eq!(
        e,
        "job.toml:17: batch.micro: 5 does not divide batch.global = 16"
    );

    let e = error_of(&MINIMAL.replace("size = \"tiny\"", "size = \"huge\""));
    assert!(
        e.starts_with("job.toml:9: model.size") && e.contains("tiny, mini"),
        "{e}"
    );

    let e = error_of(&MINIMAL.replace("seq_len = 64", "seq_len = 4096"));
    assert!(e.starts_with("job.toml:13: data.seq_len"), "{e}");

    let e = error_of(&format!("{MINIMAL}\n[cluster]\nbackend = \"mpi\"\n"));
    assert!(e.contains("cluster.backend") && e.contains("ring"), "{e}");

    let e = error_of(&format!("{MINIMAL}\n[cluster]\nmax_workers = 5\n"));
    assert!(e.contains("cluster.max_workers: 5 exceeds"), "{e}");

    let e = error_of(&MINIMAL.replace("steps = 20", "steps = 20\nstpes = 3"));
    assert!(e.contains("stpes"), "{e}");

    let e = error_of(&MINIMAL.replace("[batch]\nglobal = 16\nmicro = 4\n", ""));
    assert!(e.contains("batch"), "{e}");
    assert!(!e.contains('\n'));
}
#[test]
fn gradient_dtype_is_fp32_by_default_and_left_out_of_specs_that_keep_it() {
    let spec = JobSpec::from_toml(MINIMAL, "job.toml").unwrap();
    assert_eq!(spec.cluster.gradient_dtype, GradientDtype::Fp32);
    assert!(!spec.to_toml().contains("gradient_dtype"));
    assert!(spec.cluster.overlap_backward);
    assert!(!spec.to_toml().contains("overlap_backward"));
    assert_eq!(spec.cluster.bucket_mib, DEFAULT_BUCKET_MIB);
    assert!(!spec.to_toml().contains("bucket_mib"));
    let e = error_of(&format!("{MINIMAL}\n[cluster]\nbucket_mib = 0.0\n"));
    assert!(e.contains("cluster.bucket_mib"), "{e}");
    let bf16 = format!("{MINIMAL}\n[cluster]\ngradient_dtype = \"bf16\"\n");
    let spec = JobSpec::from_toml(&bf16, "job.toml").unwrap();
    assert_eq!(spec.cluster.gradient_dtype, GradientDtype::Bf16);
    assert!(spec.to_toml().contains("gradient_dtype = \"bf16\""));
    let e = error_of(&format!("{MINIMAL}\n[cluster]\ngradient_dtype = \"fp8\"\n"));
    assert!(e.contains("gradient_dtype") && e.contains("bf16"), "{e}");
}

#[test]
fn init_from_is_optional_and_left_out_of_specs_without_it() {
    let spec = JobSpec::from_toml(MINIMAL, "job.toml").unwrap();
    assert_eq!(spec.model.init_from, None);
    // Specs written before the field existed serialize as they did.
    assert!(!spec.to_toml().contains("init_from"));
    let with = MINIMAL.replace("[data]", "init_from = \"runs/base\"\n\n[data]");
    let spec = JobSpec::from_toml(&with, "job.toml").unwrap();
    assert_eq!(spec.model.init_from, Some(PathBuf::from("runs/base")));
    let again = JobSpec::from_toml(&spec.to_toml(), "again.toml").unwrap();
    assert_eq!(spec, again);
}

/// Found by `fuzz/` (job_spec): a value or key holding a line break (a TOML string escape)
/// was quoted as it is, so the error the doc comment promises on one line took two.
#[test]
fn errors_stay_on_one_line_whatever_the_values_hold() {
    for (text, field) in [
        (
            MINIMAL.replace("size = \"tiny\"", "size = \"ti\\nny\""),
            "model.size",
        ),
        (
            MINIMAL.replace("size = \"tiny\"", "size = \"ti\\rny\""),
            "model.size",
        ),
        (
            MINIMAL.replace(
                "[data]",
                "[model.overrides]\n\"a\\nb_pdrop\" = 2.0\n\n[data]",
            ),
            "_pdrop",
        ),
        (
            MINIMAL.replace("family = \"gpt2\"", "family = \"gp\\r\\nt2\""),
            "family",
        ),
    ] {
        let e = error_of(&text);
        assert!(!e.contains(['\n', '\r']), "{e:?}");
        assert!(e.contains(field), "{e:?}");
    }
}
