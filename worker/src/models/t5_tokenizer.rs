//! The T5 prompt tokenizer (`tokenizer_2/` of a FLUX repo): text → `max_sequence_length` ids.
//!
//! Loads `tokenizer.json` when the repo has one. Otherwise it builds what transformers'
//! `T5TokenizerFast` builds from `spiece.model` (a SentencePiece `ModelProto`, read with prost):
//! a Unigram model over the pieces and their scores, the model's precompiled normalization charsmap
//! (NFKC for T5), whitespace splitting with the `▁` metaspace prepended to every word, and the
//! `<extra_id_N>` sentinels of `tokenizer_config.json`'s `extra_ids` appended after the pieces,
//! highest id first (`<extra_id_0>` is the last id). Special tokens in the text (`</s>`, `<pad>`,
//! sentinels) are single tokens, as in transformers.
//!
//! [`T5Tokenizer::encode`] gives the pipeline's ids: the tokens, `</s>`, then the pad id up to the
//! length; a longer prompt keeps its first `length - 1` tokens and still ends with `</s>`
//! (transformers' truncation), and the untruncated length is returned so the caller can warn.

use std::path::Path;

use prost::Message;
use serde::Deserialize;
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::Precompiled;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::{AddedToken, Tokenizer};

use super::config::read_json;
use crate::error::{Result, WorkerError};

/// `tokenizer_config.json`: the keys the T5 tokenizer reads.
#[derive(Debug, Deserialize)]
struct TokenizerConfig {
    #[serde(default = "default_eos")]
    eos_token: String,
    #[serde(default = "default_pad")]
    pad_token: String,
    #[serde(default = "default_unk")]
    unk_token: String,
    /// Sentinel tokens `<extra_id_0>`… appended after the SentencePiece vocabulary.
    #[serde(default = "default_extra_ids")]
    extra_ids: usize,
}

impl Default for TokenizerConfig {
    fn default() -> Self {
        Self {
            eos_token: default_eos(),
            pad_token: default_pad(),
            unk_token: default_unk(),
            extra_ids: default_extra_ids(),
        }
    }
}

fn default_eos() -> String {
    "</s>".into()
}
fn default_pad() -> String {
    "<pad>".into()
}
fn default_unk() -> String {
    "<unk>".into()
}
fn default_extra_ids() -> usize {
    100
}

/// The ids of one prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct T5Encoding {
    /// Exactly the requested length: tokens, `</s>`, pads.
    pub ids: Vec<u32>,
    /// Tokens the prompt has with its `</s>`, before truncation (more than `ids.len()` when cut).
    pub untruncated_len: usize,
}

impl T5Encoding {
    pub fn truncated(&self) -> bool {
        self.untruncated_len > self.ids.len()
    }
}

/// A T5 tokenizer with its end and pad ids.
#[derive(Debug)]
pub struct T5Tokenizer {
    inner: Tokenizer,
    eos: u32,
    pad: u32,
}

impl T5Tokenizer {
    /// Loads `dir` (a repo's `tokenizer_2/`): `tokenizer.json`, else `spiece.model`.
    pub fn load(source_name: &str, dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let config: TokenizerConfig = if config_path.is_file() {
            read_json(source_name, &config_path)?
        } else {
            TokenizerConfig::default()
        };
        let json = dir.join("tokenizer.json");
        let spiece = dir.join("spiece.model");
        let inner = if json.is_file() {
            Tokenizer::from_file(&json)
                .map_err(|e| WorkerError::model_load(source_name, &json, e))?
        } else if spiece.is_file() {
            from_spiece(&config, &spiece)
                .map_err(|e| WorkerError::model_load(source_name, &spiece, e))?
        } else {
            return Err(WorkerError::model_load(
                source_name,
                &json,
                "missing (the T5 tokenizer needs tokenizer.json or spiece.model)",
            ));
        };
        let id = |token: &str| {
            inner.token_to_id(token).ok_or_else(|| {
                WorkerError::model_load(source_name, dir, format!("vocabulary has no '{token}'"))
            })
        };
        Ok(Self {
            eos: id(&config.eos_token)?,
            pad: id(&config.pad_token)?,
            inner,
        })
    }

    /// `tokenizer(text, padding="max_length", max_length=length, truncation=True).input_ids`.
    pub fn encode(&self, text: &str, length: usize) -> Result<T5Encoding> {
        if length == 0 {
            return Err(WorkerError::invalid(
                "max_sequence_length",
                "must be at least 1",
            ));
        }
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| WorkerError::Internal(format!("tokenizing prompt: {e}")))?;
        let tokens = encoding.get_ids();
        let keep = tokens.len().min(length - 1);
        let mut ids = Vec::with_capacity(length);
        ids.extend_from_slice(&tokens[..keep]);
        ids.push(self.eos);
        ids.resize(length, self.pad);
        Ok(T5Encoding {
            ids,
            untruncated_len: tokens.len() + 1,
        })
    }

    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }
}

/// The parts of sentencepiece's `ModelProto` (sentencepiece_model.proto, proto2) used here.
#[derive(Clone, PartialEq, Message)]
struct ModelProto {
    #[prost(message, repeated, tag = "1")]
    pieces: Vec<SentencePiece>,
    #[prost(message, optional, tag = "2")]
    trainer_spec: Option<TrainerSpec>,
    #[prost(message, optional, tag = "3")]
    normalizer_spec: Option<NormalizerSpec>,
}

#[derive(Clone, PartialEq, Message)]
struct SentencePiece {
    #[prost(string, optional, tag = "1")]
    piece: Option<String>,
    #[prost(float, optional, tag = "2")]
    score: Option<f32>,
}

#[derive(Clone, PartialEq, Message)]
struct TrainerSpec {
    /// 1 = UNIGRAM (the default), 2 = BPE, 3 = WORD, 4 = CHAR.
    #[prost(int32, optional, tag = "3")]
    model_type: Option<i32>,
    #[prost(bool, optional, tag = "35")]
    byte_fallback: Option<bool>,
    #[prost(int32, optional, tag = "40")]
    unk_id: Option<i32>,
}

#[derive(Clone, PartialEq, Message)]
struct NormalizerSpec {
    #[prost(bytes = "vec", optional, tag = "2")]
    precompiled_charsmap: Option<Vec<u8>>,
}

/// What transformers' T5 tokenizer makes of `spiece.model`.
fn from_spiece(config: &TokenizerConfig, path: &Path) -> std::result::Result<Tokenizer, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    let model = ModelProto::decode(bytes.as_slice())
        .map_err(|e| format!("not a SentencePiece model: {e}"))?;
    let trainer = model.trainer_spec.unwrap_or_default();
    match trainer.model_type.unwrap_or(1) {
        1 => {}
        other => {
            return Err(format!(
                "model_type {other} is not UNIGRAM (1), which T5 uses"
            ))
        }
    }
    let vocab: Vec<(String, f64)> = model
        .pieces
        .iter()
        .map(|p| {
            (
                p.piece.clone().unwrap_or_default(),
                f64::from(p.score.unwrap_or(0.0)),
            )
        })
        .collect();
    let unk = usize::try_from(trainer.unk_id.unwrap_or(0))
        .map_err(|_| "unk_id is negative".to_string())?;
    let unigram = Unigram::from(vocab, Some(unk), trainer.byte_fallback.unwrap_or(false))
        .map_err(|e| format!("building the unigram model: {e}"))?;
    let mut tokenizer = Tokenizer::new(unigram);
    let charsmap = model
        .normalizer_spec
        .and_then(|n| n.precompiled_charsmap)
        .filter(|c| !c.is_empty());
    if let Some(charsmap) = charsmap {
        let normalizer =
            Precompiled::from(&charsmap).map_err(|e| format!("precompiled_charsmap: {e}"))?;
        tokenizer
            .with_normalizer(Some(normalizer))
            .map_err(|e| format!("normalizer: {e}"))?;
    }
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
        WhitespaceSplit.into(),
        Metaspace::new('▁', PrependScheme::Always, true).into(),
    ])));
    let mut special: Vec<AddedToken> = [&config.pad_token, &config.eos_token, &config.unk_token]
        .into_iter()
        .map(|t| AddedToken::from(t.clone(), true))
        .collect();
    // New tokens get the next ids in order: <extra_id_{n-1}> first, so <extra_id_0> ends up last.
    special.extend(
        (0..config.extra_ids)
            .rev()
            .map(|i| AddedToken::from(format!("<extra_id_{i}>"), true)),
    );
    tokenizer
        .add_special_tokens(special)
        .map_err(|e| format!("special tokens: {e}"))?;
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_not_a_sentencepiece_model_is_refused() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| WorkerError::Internal(e.to_string()))?;
        std::fs::write(
            dir.path().join("spiece.model"),
            b"\xff\xff\xff not protobuf",
        )
        .map_err(|e| WorkerError::Internal(e.to_string()))?;
        match T5Tokenizer::load("repo", dir.path()) {
            Err(WorkerError::ModelLoad { file, message, .. }) => {
                assert_eq!(file, dir.path().join("spiece.model"));
                assert!(message.contains("SentencePiece"), "{message}");
            }
            other => panic!("expected ModelLoad, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn a_directory_without_tokenizer_files_names_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = T5Tokenizer::load("repo", dir.path()).expect_err("nothing to load");
        assert!(err.to_string().contains("spiece.model"), "{err}");
    }
}
