//! Texts to token ids for classification, framed as each family's pretraining framed its
//! inputs: `[CLS] text [SEP]` for BERT, the bare text for GPT and GPT-2 (whose last token's
//! state is pooled), truncated to `max_len` tokens.

use crate::error::{EngineError, Result};
use crate::models::Family;
use ferry_dataset::sentence_pairs::SpecialIds;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

pub struct TextEncoder {
    tokenizer: Tokenizer,
    path: PathBuf,
    family: Family,
    max_len: usize,
    /// BERT's [CLS] and [SEP].
    frame: Option<(i64, i64)>,
    pad: i64,
}

impl TextEncoder {
    /// `document_end` is the causal families' end-of-text id (their padding, as
    /// `transformers` pads GPT-2 with `eos_token_id`); BERT pads with [PAD].
    pub fn new(
        tokenizer: Tokenizer,
        path: &Path,
        family: Family,
        max_len: usize,
        document_end: Option<i64>,
    ) -> Result<TextEncoder> {
        let (frame, pad) = match family {
            Family::Bert => {
                let s = SpecialIds::from_tokenizer(&tokenizer, path)?;
                (Some((i64::from(s.cls), i64::from(s.sep))), i64::from(s.pad))
            }
            Family::Gpt2 | Family::Gpt => {
                let end = document_end.ok_or_else(|| {
                    EngineError::file(path, "the model config names no eos_token_id to pad with")
                })?;
                (None, end)
            }
        };
        let shortest = if frame.is_some() { 3 } else { 1 };
        if max_len < shortest {
            return Err(EngineError::Config {
                field: "max_len".into(),
                message: format!("must be at least {shortest} for {}", family.name()),
            });
        }
        Ok(TextEncoder {
            tokenizer,
            path: path.to_path_buf(),
            family,
            max_len,
            frame,
            pad,
        })
    }

    pub fn pad_id(&self) -> i64 {
        self.pad
    }

    pub fn family(&self) -> Family {
        self.family
    }

    /// The ids of one text, never empty.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| EngineError::file(&self.path, format!("cannot encode a text: {e}")))?;
        let ids = encoding.get_ids().iter().map(|&i| i64::from(i));
        Ok(match self.frame {
            Some((cls, sep)) => std::iter::once(cls)
                .chain(ids.take(self.max_len - 2))
                .chain(std::iter::once(sep))
                .collect(),
            None => {
                let ids: Vec<i64> = ids.take(self.max_len).collect();
                if ids.is_empty() {
                    vec![self.pad]
                } else {
                    ids
                }
            }
        })
    }
}
