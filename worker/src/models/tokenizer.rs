//! The CLIP prompt tokenizer: text → fixed-length token ids for the text encoder.
//!
//! Loads `tokenizer/tokenizer.json` when the repo has one; otherwise builds the same CLIP BPE
//! tokenizer transformers builds from `vocab.json` + `merges.txt` (NFC, whitespace runs → one
//! space, lowercase; CLIP's word split; byte-level alphabet; `</w>` end-of-word suffix). Encoding
//! gives `bos + tokens + eos`, padded with the repo's pad token to the text encoder's
//! `max_position_embeddings` (77): SD 1.x pads with `<|endoftext|>`, SD 2.x with `!`. Longer
//! prompts are cut to `bos + (max - 2) tokens + eos`, as diffusers does, with a warning.

use std::path::Path;

use serde::Deserialize;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::config::read_json;
use crate::error::{Result, WorkerError};

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
/// CLIP's word split: special tokens, English contractions, letter runs, single digits, and runs
/// of other non-space characters.
const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A special token in `tokenizer_config.json` / `special_tokens_map.json`: a bare string or an
/// `AddedToken`-style object.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TokenSpec {
    Plain(String),
    Object { content: String },
}

impl TokenSpec {
    fn content(&self) -> &str {
        match self {
            TokenSpec::Plain(s) | TokenSpec::Object { content: s } => s,
        }
    }
}

/// The special-token keys of the tokenizer's JSON side files.
#[derive(Debug, Default, Deserialize)]
struct SpecialTokens {
    pad_token: Option<TokenSpec>,
}

/// A CLIP tokenizer with the ids and length the text encoder expects.
#[derive(Debug)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    max_len: usize,
}

impl ClipTokenizer {
    /// Loads the tokenizer in `dir` (a repo's `tokenizer/`), producing `max_len` ids per prompt.
    pub fn load(source_name: &str, dir: &Path, max_len: usize) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        let mut inner = if json.is_file() {
            Tokenizer::from_file(&json)
                .map_err(|e| WorkerError::model_load(source_name, &json, e))?
        } else {
            build_from_vocab(source_name, dir)?
        };
        let pad_token = pad_token(source_name, dir)?.unwrap_or_else(|| EOS.to_owned());
        // Looked up before the special tokens are added, so that a pad token missing from the
        // vocabulary is an error rather than a new id the text encoder has no embedding for.
        let id = |token: &str| {
            inner.token_to_id(token).ok_or_else(|| {
                WorkerError::model_load(source_name, dir, format!("vocabulary has no '{token}'"))
            })
        };
        let (bos, eos, pad) = (id(BOS)?, id(EOS)?, id(&pad_token)?);
        // transformers treats every configured special token as one unsplittable token, even in
        // prompt text: with SD 2.x's pad "!" the text "!!" is two pad ids, not "!" + "!</w>".
        inner
            .add_special_tokens([
                AddedToken::from(BOS, true),
                AddedToken::from(EOS, true),
                AddedToken::from(pad_token.clone(), true),
            ])
            .map_err(|e| WorkerError::model_load(source_name, dir, e))?;
        if max_len < 2 {
            return Err(WorkerError::model_load(
                source_name,
                dir,
                "max length must be at least 2",
            ));
        }
        Ok(Self {
            inner,
            bos,
            eos,
            pad,
            max_len,
        })
    }

    /// Ids per encoded prompt (the text encoder's `max_position_embeddings`).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Prompt tokens that fit besides bos and eos.
    pub fn max_prompt_tokens(&self) -> usize {
        self.max_len - 2
    }

    /// Encodes one prompt to exactly `max_len` ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| WorkerError::Internal(format!("tokenizing prompt: {e}")))?;
        let tokens = encoding.get_ids();
        let keep = tokens.len().min(self.max_prompt_tokens());
        if keep < tokens.len() {
            tracing::warn!(
                tokens = tokens.len(),
                kept = keep,
                "prompt is longer than the text encoder accepts; truncated"
            );
        }
        let mut ids = Vec::with_capacity(self.max_len);
        ids.push(self.bos);
        ids.extend_from_slice(&tokens[..keep]);
        ids.push(self.eos);
        ids.resize(self.max_len, self.pad);
        Ok(ids)
    }
}

/// The pad token from `tokenizer_config.json`, else `special_tokens_map.json`, if either says.
fn pad_token(source_name: &str, dir: &Path) -> Result<Option<String>> {
    for name in ["tokenizer_config.json", "special_tokens_map.json"] {
        let path = dir.join(name);
        if path.is_file() {
            let tokens: SpecialTokens = read_json(source_name, &path)?;
            if let Some(pad) = tokens.pad_token {
                return Ok(Some(pad.content().to_owned()));
            }
        }
    }
    Ok(None)
}

/// Builds CLIP's BPE tokenizer from `vocab.json` + `merges.txt`.
fn build_from_vocab(source_name: &str, dir: &Path) -> Result<Tokenizer> {
    let vocab = dir.join("vocab.json");
    let merges = dir.join("merges.txt");
    for file in [&vocab, &merges] {
        if !file.is_file() {
            return Err(WorkerError::model_load(
                source_name,
                file,
                "missing (the tokenizer needs tokenizer.json, or vocab.json and merges.txt)",
            ));
        }
    }
    let fail = |e: tokenizers::Error| WorkerError::model_load(source_name, dir, e);
    let model = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
        .unk_token(EOS.to_owned())
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".to_owned())
        .fuse_unk(false)
        .build()
        .map_err(fail)?;
    let mut tokenizer = Tokenizer::new(model);
    let normalizer = NormalizerSequence::new(vec![
        NFC.into(),
        Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".to_owned()),
            " ",
        )
        .map_err(fail)?
        .into(),
        Lowercase.into(),
    ]);
    tokenizer.with_normalizer(Some(normalizer)).map_err(fail)?;
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT.to_owned()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(fail)?;
    let pre =
        PreTokenizerSequence::new(vec![split.into(), ByteLevel::new(false, true, true).into()]);
    tokenizer.with_pre_tokenizer(Some(pre));
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vocabulary of single byte-level characters, their end-of-word forms, and "cat</w>".
    fn write_vocab(dir: &Path, pad: &str) -> std::io::Result<()> {
        let mut vocab = serde_json::Map::new();
        let letters: Vec<String> = ('a'..='z').chain(['!']).map(String::from).collect();
        for l in &letters {
            vocab.insert(l.clone(), vocab.len().into());
        }
        for l in &letters {
            vocab.insert(format!("{l}</w>"), vocab.len().into());
        }
        for t in ["ca", "cat</w>", BOS, EOS] {
            vocab.insert(t.to_owned(), vocab.len().into());
        }
        std::fs::write(
            dir.join("vocab.json"),
            serde_json::Value::Object(vocab).to_string(),
        )?;
        std::fs::write(dir.join("merges.txt"), "#version: 0.2\nc a\nca t</w>\n")?;
        std::fs::write(
            dir.join("tokenizer_config.json"),
            format!(r#"{{"pad_token": {{"content": "{pad}"}}}}"#),
        )
    }

    #[test]
    fn vocab_and_merges_encode_lowercase_with_padding() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| WorkerError::Internal(e.to_string()))?;
        write_vocab(dir.path(), "!").map_err(|e| WorkerError::Internal(e.to_string()))?;
        let tok = ClipTokenizer::load("t", dir.path(), 8)?;
        // a..z = 0..25, "!" = 26, then the </w> forms 27..53, "ca" 54, "cat</w>" 55, bos 56, eos 57.
        let ids = tok.encode("  CAT   a ")?;
        assert_eq!(ids, vec![56, 55, 27, 57, 26, 26, 26, 26]);
        Ok(())
    }

    #[test]
    fn long_prompts_keep_bos_and_eos() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| WorkerError::Internal(e.to_string()))?;
        write_vocab(dir.path(), EOS).map_err(|e| WorkerError::Internal(e.to_string()))?;
        let tok = ClipTokenizer::load("t", dir.path(), 4)?;
        assert_eq!(tok.encode("a b c d")?, vec![56, 27, 28, 57]);
        assert_eq!(tok.encode("")?, vec![56, 57, 57, 57]);
        Ok(())
    }
}
