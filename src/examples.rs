//! `ferry examples`: the training examples a model family builds from a prepared directory,
//! shown as text or JSON. They come from the same code, seeds and indices as the workers', so
//! this is also how to check that two machines build the same data.

use anyhow::{Context, Result};
use ferry_dataset::sentence_pairs::{MaskingRule, PairBuilder, SpecialIds};
use ferry_dataset::shards::{TokenSplit, MANIFEST_FILE};
use ferry_dataset::tokenizer::load_tokenizer;
use ferry_engine::models::Family;
use serde_json::json;
use std::path::PathBuf;

pub struct ExamplesRequest {
    pub data: PathBuf,
    pub family: Family,
    pub seq_len: usize,
    pub seed: u64,
    pub split: String,
    pub index: u64,
    pub count: u64,
    pub json: bool,
}

pub fn run(r: &ExamplesRequest) -> Result<()> {
    let split = TokenSplit::open(&r.data, &r.split, false)?;
    let tokenizer_path = r.data.join(&split.manifest().tokenizer_file);
    let tokenizer = load_tokenizer(&tokenizer_path)?;
    let decode = |ids: &[i64]| -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        tokenizer
            .decode(&ids, false)
            .map_err(|e| anyhow::anyhow!("{}: cannot decode: {e}", tokenizer_path.display()))
    };
    let available = split.num_sequences(r.seq_len);
    if r.index >= available {
        anyhow::bail!(
            "--index {}: {} holds {available} examples of {} tokens",
            r.index,
            r.data.join(MANIFEST_FILE).display(),
            r.seq_len
        );
    }
    let end = (r.index + r.count).min(available);
    if r.family != Family::Bert {
        let mut window = Vec::new();
        for i in r.index..end {
            split.sequence(i, r.seq_len, &mut window)?;
            if r.json {
                println!("{}", json!({"index": i, "tokens": window}));
            } else {
                println!("#{i}: {}", decode(&window)?);
            }
        }
        return Ok(());
    }
    let special = SpecialIds::from_tokenizer(&tokenizer, &tokenizer_path)?;
    let builder = PairBuilder::new(&split, r.seq_len, r.seed, MaskingRule::default(), special)
        .with_context(|| format!("{}: cannot build BERT examples", r.data.display()))?;
    for i in r.index..end {
        let e = builder.example(&split, i)?;
        if r.json {
            println!("{}", serde_json::to_string(&e)?);
            continue;
        }
        let real = e.attention_mask.iter().filter(|&&m| m == 1).count();
        let label = if e.next_sentence_label == 0 {
            "IsNext"
        } else {
            "NotNext"
        };
        println!("#{i} ({label}, {real} of {} tokens):", r.seq_len);
        println!("  input:  {}", decode(&e.input_ids[..real])?);
        let targets: Vec<String> = e
            .masked
            .iter()
            .map(|&(pos, action)| {
                let original = decode(&[e.mlm_labels[pos as usize]]).unwrap_or_default();
                format!("{pos}:{original}({action:?})")
            })
            .collect();
        println!("  masked: {}", targets.join(" "));
    }
    Ok(())
}
