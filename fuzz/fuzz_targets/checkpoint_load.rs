//! Checkpoint loading as `ferry train --resume` and a data-parallel rank do it
//! (`checkpoint::verify_checkpoint`, then `checkpoint::load`): `checksums.json`,
//! `trainer_state.json`, `model.safetensors` and `optimizer.safetensors` of the fuzzer's
//! choosing, loaded into a small model and its AdamW. Nothing may panic; a load that succeeds
//! has the expected step, the run's seed and the file's weights.
//!
//! Input: one mode byte (modulo 3, how `checksums.json` comes about: 0 as given, 1 absent,
//! 2 the right digests of the other files; divided by 3, the step the checkpoint must be
//! of), then the files joined by `ferry_fuzz::PART_SEPARATOR` in the order of `FILES`
//! (checksums.json, when given, last).

#![no_main]

use ferry_engine::checkpoint::{self, CHECKSUMS_FILE, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE};
use ferry_engine::models::ParamStore;
use ferry_engine::optim::{AdamW, AdamWConfig};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::OnceLock;
use tch::{Device, Kind};

const FILES: [&str; 4] = [STATE_FILE, MODEL_FILE, OPTIMIZER_FILE, CHECKSUMS_FILE];
const SEED: u64 = 1234;
const PREFIX: &str = "transformer.";

fn scratch() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(ferry_fuzz::scratch_dir)
}

/// A GPT-2-shaped toy: an embedding, a matrix and a bias, under the family's prefix.
fn model() -> ParamStore {
    let mut ps = ParamStore::new(Device::Cpu);
    let _ = ps.zeros("transformer.wte.weight", &[4, 3]);
    let _ = ps.zeros("transformer.h.0.attn.c_attn.weight", &[3, 2]);
    let _ = ps.zeros("transformer.ln_f.bias", &[3]);
    ps
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let parts = ferry_fuzz::split_parts(rest);
    let mut files: Vec<(&str, Option<Vec<u8>>)> = FILES
        .iter()
        .enumerate()
        .map(|(i, name)| (*name, parts.get(i).map(|p| p.to_vec())))
        .collect();
    match mode % 3 {
        0 => {}
        1 => files[3].1 = None,
        _ => {
            let sums: BTreeMap<&str, String> = files[..3]
                .iter()
                .filter_map(|(name, bytes)| {
                    bytes
                        .as_ref()
                        .map(|b| (*name, hex::encode(Sha256::digest(b))))
                })
                .collect();
            files[3].1 = Some(serde_json::to_vec(&sums).expect("JSON of a map"));
        }
    }
    let dir = scratch().path();
    let borrowed: Vec<(&str, Option<&[u8]>)> =
        files.iter().map(|(n, b)| (*n, b.as_deref())).collect();
    ferry_fuzz::write_files(dir, &borrowed);

    let ps = model();
    let config = AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let mut opt = AdamW::new(&ps, config);
    let step = u64::from(mode / 3);
    let state = match checkpoint::verify_checkpoint(dir, step)
        .and_then(|state| checkpoint::load(dir, state, &ps, &mut opt, SEED, PREFIX))
    {
        Ok(state) => state,
        Err(e) => return ferry_fuzz::debug(format!("refused: {e}")),
    };
    ferry_fuzz::debug(format!("restored step {}", state.step));
    assert_eq!(state.seed, SEED);
    assert_eq!(state.step, step);
    assert_eq!(opt.steps(), state.optimizer_steps);
    // What was loaded is what the file holds, for every parameter.
    let file = ferry_engine::weights::load_safetensors(&dir.join(MODEL_FILE))
        .expect("the model file restored from reads again");
    for (name, param) in ps.named() {
        let src = file
            .get(name)
            .or_else(|| file.get(name.strip_prefix(PREFIX).unwrap_or(name)))
            .expect("a restored parameter is in the file");
        let same = src
            .to_kind(Kind::Float)
            .f_equal(&param.to_kind(Kind::Float))
            .unwrap_or(false);
        let nan = src.isnan().any().int64_value(&[]) != 0;
        assert!(same || nan, "{name} differs from the file");
    }
});
