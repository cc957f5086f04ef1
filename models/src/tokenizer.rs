//! Tokenizers: the built-in word-level tokenizer for the synthetic captions' grammar, and
//! Hugging Face `tokenizer.json` files through the `tokenizers` crate.

use std::fmt::Debug;
use std::path::Path;

use crate::data::{GRAMMAR_WORDS, QUESTION_WORDS};
use crate::error::{ModelError, Result};

/// Turns captions into token ids and back; ids 0..vocab_size.
pub trait Tokenizer: Send + Sync + Debug {
    /// Ids of the words of `text` (no special tokens).
    fn encode(&self, text: &str) -> Result<Vec<i64>>;
    /// Text of `ids`, special tokens dropped.
    fn decode(&self, ids: &[i64]) -> String;
    /// Number of ids the tokenizer can produce.
    fn vocab_size(&self) -> usize;
    /// Padding id.
    fn pad_id(&self) -> i64;
    /// Beginning-of-sequence id.
    fn bos_id(&self) -> i64;
    /// End-of-sequence id.
    fn eos_id(&self) -> i64;
    /// The `[MASK]` id of masked language modelling, if the vocabulary has one.
    fn mask_id(&self) -> Option<i64> {
        None
    }
}

/// Encodes `text` as `[BOS] words [EOS] [PAD]...` of exactly `len` tokens (words truncated
/// to fit).
pub fn encode_padded(tok: &dyn Tokenizer, text: &str, len: usize) -> Result<Vec<i64>> {
    let words = tok.encode(text)?;
    let keep = words.len().min(len.saturating_sub(2));
    let mut ids = Vec::with_capacity(len);
    ids.push(tok.bos_id());
    ids.extend_from_slice(&words[..keep]);
    ids.push(tok.eos_id());
    ids.resize(len, tok.pad_id());
    Ok(ids)
}

/// Builds the tokenizer named by `[data] tokenizer` and checks it fits `vocab_size`.
pub fn load(spec: &str, vocab_size: usize) -> Result<Box<dyn Tokenizer>> {
    let tok: Box<dyn Tokenizer> = if spec == "grammar" {
        Box::new(GrammarTokenizer::new())
    } else {
        Box::new(HfTokenizer::from_file(Path::new(spec))?)
    };
    if tok.vocab_size() > vocab_size {
        return Err(ModelError::BadConfig {
            key: "model.vocab_size".into(),
            message: format!(
                "the tokenizer {spec:?} has {} ids but the model's vocab_size is {vocab_size}; set model.vocab_size ≥ {}",
                tok.vocab_size(),
                tok.vocab_size()
            ),
        });
    }
    Ok(tok)
}

/// Word-level tokenizer over the synthetic captions' closed vocabulary.
#[derive(Debug, Clone)]
pub struct GrammarTokenizer {
    words: Vec<&'static str>,
}

const SPECIALS: [&str; 4] = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"];
const MASK: &str = "[MASK]";

impl GrammarTokenizer {
    /// The tokenizer: ids 0–3 are `[PAD] [BOS] [EOS] [UNK]`, then the grammar's words, the
    /// synthetic questions' and answers' words ([`QUESTION_WORDS`]), and `[MASK]` last (the
    /// captions' ids are those of the grammar alone).
    pub fn new() -> GrammarTokenizer {
        let mut words: Vec<&'static str> = SPECIALS.to_vec();
        words.extend(GRAMMAR_WORDS.iter().copied());
        words.extend(QUESTION_WORDS.iter().copied());
        words.push(MASK);
        GrammarTokenizer { words }
    }
}

impl Default for GrammarTokenizer {
    fn default() -> Self {
        GrammarTokenizer::new()
    }
}

impl Tokenizer for GrammarTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<i64>> {
        Ok(text
            .split_whitespace()
            .map(|w| self.words.iter().position(|v| *v == w).unwrap_or(3) as i64)
            .collect())
    }

    fn decode(&self, ids: &[i64]) -> String {
        ids.iter()
            .filter(|&&i| i >= SPECIALS.len() as i64 && i != self.words.len() as i64 - 1)
            .filter_map(|&i| self.words.get(i as usize).copied())
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn vocab_size(&self) -> usize {
        self.words.len()
    }
    fn pad_id(&self) -> i64 {
        0
    }
    fn bos_id(&self) -> i64 {
        1
    }
    fn eos_id(&self) -> i64 {
        2
    }
    fn mask_id(&self) -> Option<i64> {
        Some(self.words.len() as i64 - 1)
    }
}

/// A Hugging Face `tokenizer.json`. It must define a padding token (`[PAD]` or `<pad>`), a
/// beginning token (`[BOS]`, `<s>` or `[CLS]`) and an end token (`[EOS]`, `</s>` or `[SEP]`);
/// masked language modelling needs a mask token (`[MASK]` or `<mask>`).
#[derive(Debug)]
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    pad: i64,
    bos: i64,
    eos: i64,
    mask: Option<i64>,
}

impl HfTokenizer {
    /// Loads `path`.
    pub fn from_file(path: &Path) -> Result<HfTokenizer> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| ModelError::Tokenizer(format!("cannot load {}: {e}", path.display())))?;
        let find = |names: &[&str]| -> Result<i64> {
            names
                .iter()
                .find_map(|n| inner.token_to_id(n))
                .map(i64::from)
                .ok_or_else(|| {
                    ModelError::Tokenizer(format!(
                        "{} defines none of the tokens {names:?}; add one to its vocabulary",
                        path.display()
                    ))
                })
        };
        Ok(HfTokenizer {
            pad: find(&["[PAD]", "<pad>"])?,
            bos: find(&["[BOS]", "<s>", "[CLS]"])?,
            eos: find(&["[EOS]", "</s>", "[SEP]"])?,
            mask: ["[MASK]", "<mask>"]
                .iter()
                .find_map(|n| inner.token_to_id(n))
                .map(i64::from),
            inner,
        })
    }
}

impl Tokenizer for HfTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer(format!("cannot encode {text:?}: {e}")))?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    fn decode(&self, ids: &[i64]) -> String {
        let ids: Vec<u32> = ids.iter().filter_map(|&i| u32::try_from(i).ok()).collect();
        self.inner.decode(&ids, true).unwrap_or_default()
    }

    fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
    fn pad_id(&self) -> i64 {
        self.pad
    }
    fn bos_id(&self) -> i64 {
        self.bos
    }
    fn eos_id(&self) -> i64 {
        self.eos
    }
    fn mask_id(&self) -> Option<i64> {
        self.mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammar_round_trip_and_padding() {
        let t = GrammarTokenizer::new();
        let text = "a small red circle left of a large blue square";
        let ids = encode_padded(&t, text, 16).unwrap();
        assert_eq!(ids.len(), 16);
        assert_eq!(ids[0], t.bos_id());
        assert_eq!(ids[11], t.eos_id());
        assert_eq!(ids[12], t.pad_id());
        assert_eq!(t.decode(&ids), text);
        assert!(!ids.contains(&3), "no unknown words in the grammar");
    }

    #[test]
    fn hf_word_level_tokenizer_loads_and_encodes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let mut vocab = serde_json::Map::new();
        for (i, w) in ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "a", "red", "circle"]
            .iter()
            .enumerate()
        {
            vocab.insert(w.to_string(), serde_json::json!(i));
        }
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
        });
        std::fs::write(&path, json.to_string()).unwrap();
        let t = load(path.to_str().unwrap(), 64).unwrap();
        assert_eq!(t.encode("a red circle").unwrap(), vec![4, 5, 6]);
        assert_eq!(t.encode("a blue circle").unwrap(), vec![4, 3, 6]);
        assert_eq!((t.pad_id(), t.bos_id(), t.eos_id()), (0, 1, 2));
        let e = load(path.to_str().unwrap(), 4).unwrap_err();
        assert!(e.to_string().contains("model.vocab_size"), "{e}");
    }
}
