//! Parity with Hugging Face `transformers` and `tokenizers`, both directions (issue: training
//! engine, must-show 1). The Python side is tests/python/hf_parity.py in the project's venv.

mod support;

use ferry_engine::models::bert::BertInputs;
use ferry_engine::models::Model;
use ferry_engine::pretrained::load_model;
use ferry_engine::weights::load_safetensors;
use std::collections::HashMap;
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

/// The logits ferry computes for `inputs` with the model in `dir`, under the names the
/// Python side uses: `logits` (GPT-2, GPT) or `mlm_logits` and `nsp_logits` (BERT).
fn ferry_logits(model: &Model, inputs: &HashMap<String, Tensor>) -> Vec<(&'static str, Tensor)> {
    tch::no_grad(|| match model {
        Model::Bert(bert) => {
            let (mlm, nsp) = bert.pretraining_logits(&BertInputs {
                input_ids: &inputs["input_ids"],
                token_type_ids: &inputs["token_type_ids"],
                attention_mask: &inputs["attention_mask"],
            });
            vec![("mlm_logits", mlm), ("nsp_logits", nsp)]
        }
        lm => vec![(
            "logits",
            lm.as_causal().unwrap().logits(&inputs["input_ids"]),
        )],
    })
}

/// The largest difference over every logit tensor the reference holds.
fn worst_difference(
    model: &Model,
    inputs: &HashMap<String, Tensor>,
    reference: &HashMap<String, Tensor>,
) -> f64 {
    ferry_logits(model, inputs)
        .iter()
        .map(|(name, ours)| {
            let d = max_abs_diff(ours, &reference[*name]);
            println!("  {name}: max |difference| = {d:.3e}");
            d
        })
        .fold(0.0, f64::max)
}

/// transformers saves a randomly initialised model (biases and norms perturbed); ferry loads
/// it and must give the same logits. Then one element of one weight is changed, and the
/// check must fail, so the comparison is not vacuous.
fn transformers_model_loads_in_ferry(family: &str, perturbed: &str) {
    let dir = scratch(&format!("hf-{family}"));
    python_step(&[format!("make-{family}").as_ref(), dir.as_os_str()]);
    let reference = load_safetensors(&dir.join("reference.safetensors")).unwrap();
    let loaded = load_model(&dir, Device::Cpu).expect("ferry loads the model directory");
    println!("transformers {family} -> ferry:");
    let diff = worst_difference(&loaded.model, &reference, &reference);
    assert!(diff <= 1e-4, "{family}: max abs logit difference {diff}");
    // One element: a shift of every element of a bias feeding a LayerNorm would cancel.
    tch::no_grad(|| {
        let p = loaded.params.get(perturbed).unwrap();
        let _ = p.reshape([-1]).narrow(0, 0, 1).g_add_scalar_(0.1);
    });
    let off = worst_difference(&loaded.model, &reference, &reference);
    // Ten times the tolerance: the parity check would catch this one changed number.
    assert!(
        off > 1e-3,
        "{family}: a perturbed model still matched ({off})"
    );
}

#[test]
fn transformers_gpt2_loads_in_ferry_with_the_same_logits() {
    transformers_model_loads_in_ferry("gpt2", "transformer.h.1.mlp.c_proj.bias");
}

#[test]
fn transformers_openai_gpt_loads_in_ferry_with_the_same_logits() {
    transformers_model_loads_in_ferry("gpt", "transformer.h.1.mlp.c_proj.bias");
}

#[test]
fn transformers_bert_for_pretraining_loads_in_ferry_with_the_same_logits() {
    transformers_model_loads_in_ferry("bert", "bert.encoder.layer.1.output.dense.bias");
}

/// ferry trains a tiny model for 3 steps and checkpoints it; transformers opens the
/// checkpoint with `from_pretrained` and must compute the same logits as ferry.
fn ferry_checkpoint_opens_in_transformers(family: &str, seq_len: &str) {
    let data = prepared_shared_corpus_for(family);
    let run = scratch(&format!("ferry-to-hf-{family}"));
    run_ok(
        ferry()
            .args([
                "train",
                "--no-progress",
                "--model",
                family,
                "--size",
                "tiny",
            ])
            .args(["--seq-len", seq_len, "--steps", "3", "--global-batch", "4"])
            .args([
                "--micro-batch",
                "4",
                "--threads",
                "2",
                "--eval-sequences",
                "4",
            ])
            .arg("--data")
            .arg(data)
            .arg("--run-dir")
            .arg(&run),
    );
    let ckpt = run.join("checkpoints/step-00000003");
    let ids = Tensor::from_slice(
        &(0..40)
            .map(|i| (i * 97 + 13) % 8000 + 5)
            .collect::<Vec<i64>>(),
    )
    .reshape([2, 20]);
    // BERT: segments and padding exercised as in the other direction.
    let types = Tensor::from_slice(
        &(0..40)
            .map(|i| i64::from(i % 20 >= 11))
            .collect::<Vec<i64>>(),
    )
    .reshape([2, 20]);
    let mask = Tensor::from_slice(&(0..40).map(|i| i64::from(i < 34)).collect::<Vec<i64>>())
        .reshape([2, 20]);
    let ids_file = run.join("ids.safetensors");
    Tensor::write_safetensors(
        &[
            ("input_ids", &ids),
            ("token_type_ids", &types),
            ("attention_mask", &mask),
        ],
        &ids_file,
    )
    .unwrap();
    python_step(&["logits".as_ref(), ckpt.as_os_str(), ids_file.as_os_str()]);
    let theirs = load_safetensors(&ckpt.join("hf_logits.safetensors")).unwrap();
    let inputs: HashMap<String, Tensor> = [
        ("input_ids", ids),
        ("token_type_ids", types),
        ("attention_mask", mask),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let loaded = load_model(&ckpt, Device::Cpu).unwrap();
    println!("ferry {family} -> transformers:");
    let diff = worst_difference(&loaded.model, &inputs, &theirs);
    assert!(diff <= 1e-4, "{family}: max abs logit difference {diff}");
}

#[test]
fn ferry_gpt2_checkpoint_opens_in_transformers_with_the_same_logits() {
    ferry_checkpoint_opens_in_transformers("gpt2", "64");
}

#[test]
fn ferry_gpt_checkpoint_opens_in_transformers_with_the_same_logits() {
    ferry_checkpoint_opens_in_transformers("gpt", "64");
}

#[test]
fn ferry_bert_checkpoint_opens_in_transformers_with_the_same_logits() {
    ferry_checkpoint_opens_in_transformers("bert", "64");
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
    let tok = ferry_dataset::tokenizer::load_tokenizer(&tokenizer_file).unwrap();
    assert_eq!(python_ids.len(), texts.len());
    for (text, theirs) in texts.iter().zip(&python_ids) {
        let ours = tok.encode(*text, true).unwrap().get_ids().to_vec();
        assert_eq!(&ours, theirs, "different ids for {text:?}");
        let round_trip = tok.decode(&ours, false).unwrap();
        assert_eq!(&round_trip, text, "byte-level BPE must round-trip exactly");
    }
}

/// GPT's BPE and BERT's WordPiece tokenizers as ferry trains them encode like Python
/// `tokenizers` loading the same file (with special tokens for BERT: [CLS] … [SEP]).
#[test]
fn ferry_gpt_and_bert_tokenizers_encode_like_python_tokenizers() {
    let texts = [
        "The history of the Roman Empire spans centuries .",
        " = Homarus gammarus = ",
        "numbers 1 @,@ 000 and 3 @.@ 5 , <unk> tokens",
        "Unicode: café, naïve, 東京, emoji 🚀✈️, tabs\tand  double  spaces",
        "",
        "<|endoftext|> between documents",
    ];
    let texts_file = scratch("tok-texts-gpt-bert");
    std::fs::write(&texts_file, texts.join("\n")).unwrap();
    for family in ["gpt", "bert"] {
        let tokenizer_file = prepared_shared_corpus_for(family).join("tokenizer.json");
        let out = python_step(&[
            "encode".as_ref(),
            tokenizer_file.as_os_str(),
            texts_file.as_os_str(),
        ]);
        let python_ids: Vec<Vec<u32>> = serde_json::from_slice(&out.stdout).unwrap();
        let tok = ferry_dataset::tokenizer::load_tokenizer(&tokenizer_file).unwrap();
        assert_eq!(python_ids.len(), texts.len());
        for (text, theirs) in texts.iter().zip(&python_ids) {
            let ours = tok.encode(*text, true).unwrap().get_ids().to_vec();
            assert_eq!(&ours, theirs, "{family}: different ids for {text:?}");
        }
        let history = tok.encode(texts[0], true).unwrap();
        println!("{family}: {:?}", history.get_tokens());
        if family == "bert" {
            assert_eq!(
                history.get_tokens().first().map(String::as_str),
                Some("[CLS]")
            );
            assert_eq!(
                history.get_tokens().last().map(String::as_str),
                Some("[SEP]")
            );
        } else {
            assert!(history.get_tokens().iter().any(|t| t.ends_with("</w>")));
            // WikiText's literal <unk> is GPT's unknown token, one id.
            let unk = tok.token_to_id("<unk>").unwrap();
            assert!(tok
                .encode(texts[2], false)
                .unwrap()
                .get_ids()
                .contains(&unk));
        }
    }
}
