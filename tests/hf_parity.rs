//! Parity with Hugging Face `transformers` and `tokenizers`, both directions (issue: training
//! engine, must-show 1). The Python side is tests/python/hf_parity.py in the project's venv.

mod support;

use ferry_worker::pretrained::load_gpt2;
use ferry_worker::weights::load_safetensors;
use std::path::Path;
use support::*;
use tch::{Device, Tensor};

fn python_step(args: &[&std::ffi::OsStr]) -> std::process::Output {
    run_ok(
        std::process::Command::new(python())
            .arg(root().join("tests/python/hf_parity.py"))
            .args(args),
    )
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "logit shapes differ");
    (a - b).abs().max().double_value(&[])
}

fn ferry_logits(model_dir: &Path, ids: &Tensor) -> Tensor {
    let loaded = load_gpt2(model_dir, Device::Cpu).expect("ferry loads the model directory");
    tch::no_grad(|| loaded.model.logits(ids))
}

#[test]
fn transformers_gpt2_loads_in_ferry_with_the_same_logits() {
    let dir = scratch("hf-gpt2");
    python_step(&["make-gpt2".as_ref(), dir.as_os_str()]);
    let reference = load_safetensors(&dir.join("reference.safetensors")).unwrap();
    let ids = &reference["input_ids"];
    let ours = ferry_logits(&dir, ids);
    let diff = max_abs_diff(&ours, &reference["logits"]);
    println!("transformers -> ferry: max |logit difference| = {diff:.3e}");
    assert!(diff <= 1e-4, "max abs logit difference {diff}");
    // The check can fail: a model with one weight changed does not match. (One element: a
    // shift of every element of a residual bias would be cancelled by the final LayerNorm.)
    let changed = load_gpt2(&dir, Device::Cpu).unwrap();
    tch::no_grad(|| {
        let bias = changed
            .params
            .get("transformer.h.1.mlp.c_proj.bias")
            .unwrap();
        let _ = bias.narrow(0, 0, 1).g_add_scalar_(0.01);
    });
    let off = max_abs_diff(
        &tch::no_grad(|| changed.model.logits(ids)),
        &reference["logits"],
    );
    assert!(off > 1e-3, "a perturbed model still matched ({off})");
}

#[test]
fn ferry_checkpoint_opens_in_transformers_with_the_same_logits() {
    let data = prepared_shared_corpus();
    let run = scratch("ferry-to-hf");
    run_ok(
        ferry()
            .args([
                "train",
                "--no-progress",
                "--size",
                "tiny",
                "--seq-len",
                "64",
                "--steps",
                "3",
                "--global-batch",
                "4",
                "--micro-batch",
                "4",
                "--threads",
                "2",
                "--eval-sequences",
                "4",
                "--data",
            ])
            .arg(data)
            .arg("--run-dir")
            .arg(&run),
    );
    let ckpt = run.join("checkpoints/step-00000003");
    let ids = Tensor::from_slice(&(0..40).map(|i| (i * 97 + 13) % 8192).collect::<Vec<i64>>())
        .reshape([2, 20]);
    let ids_file = run.join("ids.safetensors");
    Tensor::write_safetensors(&[("input_ids", &ids)], &ids_file).unwrap();
    python_step(&["logits".as_ref(), ckpt.as_os_str(), ids_file.as_os_str()]);
    let theirs = load_safetensors(&ckpt.join("hf_logits.safetensors")).unwrap();
    let diff = max_abs_diff(&ferry_logits(&ckpt, &ids), &theirs["logits"]);
    println!("ferry -> transformers: max |logit difference| = {diff:.3e}");
    assert!(diff <= 1e-4, "max abs logit difference {diff}");
}

#[test]
fn ferry_tokenizer_encodes_like_python_tokenizers() {
    let data = prepared_shared_corpus();
    let tokenizer_file = data.join("tokenizer.json");
    let texts = [
        "The history of the Roman Empire spans centuries .",
        " = Homarus gammarus = ",
        "Alice was beginning to get very tired of sitting by her sister on the bank",
        "numbers 1 @,@ 000 and 3 @.@ 5 , <unk> tokens",
        "Unicode: café, naïve, 東京, emoji 🚀✈️, tabs\tand  double  spaces",
        "",
        "<|endoftext|> between documents <|endoftext|>",
    ];
    let texts_file = scratch("tok-texts");
    std::fs::write(&texts_file, texts.join("\n")).unwrap();
    let out = python_step(&[
        "encode".as_ref(),
        tokenizer_file.as_os_str(),
        texts_file.as_os_str(),
    ]);
    let python_ids: Vec<Vec<u32>> = serde_json::from_slice(&out.stdout).unwrap();
    let tok = ferry_common::tokenizer::load_tokenizer(&tokenizer_file).unwrap();
    assert_eq!(python_ids.len(), texts.len());
    for (text, theirs) in texts.iter().zip(&python_ids) {
        let ours = tok.encode(*text, true).unwrap().get_ids().to_vec();
        assert_eq!(&ours, theirs, "different ids for {text:?}");
        let round_trip = tok.decode(&ours, false).unwrap();
        assert_eq!(&round_trip, text, "byte-level BPE must round-trip exactly");
    }
}
