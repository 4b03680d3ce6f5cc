//! The T5 v1.1 encoder FLUX uses as its main text encoder (`text_encoder_2`, `T5EncoderModel`).
//!
//! Same computation as transformers' `T5EncoderModel(...).last_hidden_state` without an attention
//! mask (FluxPipeline passes none, so pad tokens are attended to):
//!
//! ```text
//! ids ─shared─▶ x ─┬─ per block: x += o(attn(rms(x)) + relative position bias)   (no 1/sqrt(d) scale)
//!                  │             x += wo(act(wi_0(rms(x))) · wi_1(rms(x)))        (gated-gelu: tanh GELU)
//!                  └─ final RMS norm ─▶ (B, S, d_model)
//! ```
//!
//! The position bias comes from block 0's `relative_attention_bias` (buckets of the key − query
//! distance, log-spaced past half the buckets) and is shared by every block. RMS norms and the
//! softmax run in float32. float16 overflows in T5 (the feed-forward activations of T5-XXL pass
//! 65504: NaN images, candle #2480): [`T5Encoder::load`] refuses it and [`run_dtype`] says what to
//! use instead. Weights: `shared.weight` (or `encoder.embed_tokens.weight`), `encoder.block.N.…`,
//! `encoder.final_layer_norm.weight` in `model.safetensors` (or shards).

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, Linear, VarBuilder};
use serde::Deserialize;

use super::config::read_json;
use super::weights;
use crate::error::{Result, WorkerError};

/// `text_encoder_2/config.json` (a transformers `T5Config`): the keys the encoder uses.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    /// Per-head width; `num_heads · d_kv` need not equal `d_model`.
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// "relu" (T5 1.0), "gated-gelu" (v1.1, FLUX), or "[gated-]<act>".
    #[serde(default = "default_feed_forward")]
    pub feed_forward_proj: String,
}

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_feed_forward() -> String {
    "relu".into()
}

/// The feed-forward activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activation {
    Relu,
    /// Exact (erf) GELU: transformers' "gelu".
    Gelu,
    /// tanh-approximated GELU: transformers' "gelu_new", what "gated-gelu" means.
    GeluTanh,
    Silu,
}

impl Activation {
    fn apply(self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::Relu => xs.relu(),
            Activation::Gelu => xs.gelu_erf(),
            Activation::GeluTanh => xs.gelu(),
            Activation::Silu => xs.silu(),
        }
    }
}

impl T5Config {
    /// `(gated, activation)` as transformers' `T5Config` derives them from `feed_forward_proj`.
    fn feed_forward(&self) -> std::result::Result<(bool, Activation), String> {
        let proj = self.feed_forward_proj.as_str();
        let (gated, act) = match proj.split_once('-') {
            Some(("gated", act)) => (true, act),
            Some(_) => return Err(format!("feed_forward_proj '{proj}' is not '[gated-]<act>'")),
            None => (false, proj),
        };
        let act = match (proj, act) {
            ("gated-gelu", _) => Activation::GeluTanh,
            (_, "relu") => Activation::Relu,
            (_, "gelu") => Activation::Gelu,
            (_, "gelu_new" | "gelu_pytorch_tanh") => Activation::GeluTanh,
            (_, "silu" | "swish") => Activation::Silu,
            (_, other) => return Err(format!("activation '{other}' is not supported")),
        };
        Ok((gated, act))
    }
}

/// The dtype to run T5 in when the model runs in `requested`: float16 becomes bfloat16 (T5
/// overflows in float16); every other dtype is kept. Callers log when it differs.
pub fn run_dtype(requested: DType) -> DType {
    match requested {
        DType::F16 => DType::BF16,
        other => other,
    }
}

/// T5's `RMSNorm`-style layer norm (no mean, no bias): variance in float32, cast back to the
/// weight's dtype, then scaled.
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn new(dim: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let x32 = xs.to_dtype(DType::F32)?;
        let variance = x32.sqr()?.mean_keepdim(D::Minus1)?;
        x32.broadcast_div(&(variance + self.eps)?.sqrt()?)?
            .to_dtype(self.weight.dtype())?
            .broadcast_mul(&self.weight)
    }
}

fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    candle_nn::linear_no_bias(in_dim, out_dim, vb)
}

/// One encoder block: self-attention and feed-forward, each pre-normed with a residual.
#[derive(Debug, Clone)]
struct Block {
    attn_norm: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ff_norm: LayerNorm,
    /// `wi_0` when gated, else `wi`.
    wi: Linear,
    /// `wi_1`: the gate's linear half.
    wi_gate: Option<Linear>,
    wo: Linear,
}

impl Block {
    fn new(cfg: &T5Config, gated: bool, vb: VarBuilder) -> candle_core::Result<Self> {
        let inner = cfg.num_heads * cfg.d_kv;
        let attn = vb.pp("layer.0");
        let sa = attn.pp("SelfAttention");
        let ff = vb.pp("layer.1");
        let dense = ff.pp("DenseReluDense");
        let (wi, wi_gate) = if gated {
            (
                linear(cfg.d_model, cfg.d_ff, dense.pp("wi_0"))?,
                Some(linear(cfg.d_model, cfg.d_ff, dense.pp("wi_1"))?),
            )
        } else {
            (linear(cfg.d_model, cfg.d_ff, dense.pp("wi"))?, None)
        };
        Ok(Self {
            attn_norm: LayerNorm::new(cfg.d_model, cfg.layer_norm_epsilon, attn.pp("layer_norm"))?,
            q: linear(cfg.d_model, inner, sa.pp("q"))?,
            k: linear(cfg.d_model, inner, sa.pp("k"))?,
            v: linear(cfg.d_model, inner, sa.pp("v"))?,
            o: linear(inner, cfg.d_model, sa.pp("o"))?,
            ff_norm: LayerNorm::new(cfg.d_model, cfg.layer_norm_epsilon, ff.pp("layer_norm"))?,
            wi,
            wi_gate,
            wo: linear(cfg.d_ff, cfg.d_model, dense.pp("wo"))?,
        })
    }

    /// `xs` (B, S, d_model); `bias` (1, heads, S, S).
    fn forward(
        &self,
        xs: &Tensor,
        bias: &Tensor,
        heads: usize,
        act: Activation,
    ) -> candle_core::Result<Tensor> {
        let (b, s, _) = xs.dims3()?;
        let h = self.attn_norm.forward(xs)?;
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            let width = t.dim(2)?;
            t.reshape((b, s, heads, width / heads))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q.forward(&h)?)?;
        let k = split(self.k.forward(&h)?)?;
        let v = split(self.v.forward(&h)?)?;
        let scores = q
            .matmul(&k.t()?)?
            .broadcast_add(&bias.to_dtype(q.dtype())?)?;
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
        let attn = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, ()))?;
        let xs = (xs + self.o.forward(&attn)?)?;

        let h = self.ff_norm.forward(&xs)?;
        let mut hidden = act.apply(&self.wi.forward(&h)?)?;
        if let Some(gate) = &self.wi_gate {
            hidden = (hidden * gate.forward(&h)?)?;
        }
        xs + self.wo.forward(&hidden)?
    }
}

/// A loaded T5 encoder.
#[derive(Debug, Clone)]
pub struct T5Encoder {
    embed: Embedding,
    /// Block 0's (buckets, heads) relative position bias table.
    relative_bias: Embedding,
    blocks: Vec<Block>,
    final_norm: LayerNorm,
    activation: Activation,
    config: T5Config,
}

impl T5Encoder {
    /// Loads `dir` (a repo's `text_encoder_2/`) in `dtype`, which must not be float16 (see
    /// [`run_dtype`]).
    pub fn load(source_name: &str, dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config = Self::read_config(source_name, dir)?;
        if dtype == DType::F16 {
            return Err(WorkerError::model_load(
                source_name,
                dir,
                "T5 overflows in float16 (NaN images); run it in bfloat16 or float32",
            ));
        }
        let vb = weights::load_var_builder(source_name, dir, "model", dtype, device)?;
        Self::build(vb, &config)
            .map_err(|e| WorkerError::model_load(source_name, dir.join("model.safetensors"), e))
    }

    /// Reads and checks `dir/config.json`; errors name the file and key.
    pub fn read_config(source_name: &str, dir: &Path) -> Result<T5Config> {
        let config_path = dir.join("config.json");
        let config: T5Config = read_json(source_name, &config_path)?;
        config.feed_forward().map_err(|e| {
            WorkerError::model_load(
                source_name,
                &config_path,
                format!("key 'feed_forward_proj': {e}"),
            )
        })?;
        if config.num_heads == 0 || config.d_kv == 0 || config.relative_attention_num_buckets < 4 {
            return Err(WorkerError::model_load(
                source_name,
                &config_path,
                "num_heads, d_kv must be positive and relative_attention_num_buckets at least 4",
            ));
        }
        Ok(config)
    }

    /// Builds the encoder from weights rooted at the file's top level, for a config
    /// [`Self::read_config`] accepted (the pipeline's offloadable component builds it this way).
    pub fn build(vb: VarBuilder, config: &T5Config) -> candle_core::Result<Self> {
        let (gated, activation) = config.feed_forward().map_err(candle_core::Error::msg)?;
        Self::new(vb, config.clone(), gated, activation)
    }

    fn new(
        vb: VarBuilder,
        config: T5Config,
        gated: bool,
        activation: Activation,
    ) -> candle_core::Result<Self> {
        // Tied checkpoints store the table once, under either name.
        let embed_name = ["shared", "encoder.embed_tokens"]
            .into_iter()
            .find(|name| vb.contains_tensor(&format!("{name}.weight")))
            .unwrap_or("shared");
        let embed = candle_nn::embedding(config.vocab_size, config.d_model, vb.pp(embed_name))?;
        let encoder = vb.pp("encoder");
        let relative_bias = candle_nn::embedding(
            config.relative_attention_num_buckets,
            config.num_heads,
            encoder.pp("block.0.layer.0.SelfAttention.relative_attention_bias"),
        )?;
        let blocks = (0..config.num_layers)
            .map(|i| Block::new(&config, gated, encoder.pp("block").pp(i)))
            .collect::<candle_core::Result<_>>()?;
        let final_norm = LayerNorm::new(
            config.d_model,
            config.layer_norm_epsilon,
            encoder.pp("final_layer_norm"),
        )?;
        Ok(Self {
            embed,
            relative_bias,
            blocks,
            final_norm,
            activation,
            config,
        })
    }

    pub fn config(&self) -> &T5Config {
        &self.config
    }

    /// `ids` (B, S) u32 → `last_hidden_state` (B, S, d_model) in the weights' dtype.
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (_, s) = ids.dims2()?;
        let mut xs = self.embed.forward(ids)?;
        let bias = self.position_bias(s, ids.device())?;
        for block in &self.blocks {
            xs = block.forward(&xs, &bias, self.config.num_heads, self.activation)?;
        }
        self.final_norm.forward(&xs)
    }

    /// (1, heads, S, S) bias: `relative_attention_bias[bucket(key - query)]`.
    fn position_bias(&self, s: usize, device: &Device) -> candle_core::Result<Tensor> {
        let cfg = &self.config;
        let buckets: Vec<u32> = (0..s)
            .flat_map(|q| {
                (0..s).map(move |k| {
                    relative_bucket(
                        k as i64 - q as i64,
                        cfg.relative_attention_num_buckets,
                        cfg.relative_attention_max_distance,
                    )
                })
            })
            .collect();
        let buckets = Tensor::from_vec(buckets, (s, s), device)?;
        self.relative_bias
            .forward(&buckets)?
            .permute((2, 0, 1))?
            .unsqueeze(0)
    }
}

/// transformers' `T5Attention._relative_position_bucket(relative_position, bidirectional=True)`:
/// half the buckets per direction; distances below a quarter of the buckets get their own bucket,
/// larger ones share log-spaced buckets up to `max_distance`. The log runs in float32 and is
/// truncated, like torch's `.to(torch.long)`.
pub fn relative_bucket(relative_position: i64, num_buckets: usize, max_distance: usize) -> u32 {
    let half = num_buckets / 2;
    let mut bucket = if relative_position > 0 { half } else { 0 };
    let distance = relative_position.unsigned_abs() as usize;
    let max_exact = half / 2;
    bucket += if distance < max_exact {
        distance
    } else {
        // torch: log(float32(d) / max_exact) / float32(log(max_distance / max_exact)) * (half - max_exact)
        let log_ratio = (distance as f32 / max_exact as f32).ln();
        let log_range = (max_distance as f64 / max_exact as f64).ln() as f32;
        let large = max_exact + (log_ratio / log_range * (half - max_exact) as f32) as usize;
        large.min(half - 1)
    };
    bucket as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feed_forward_names_map_like_transformers() {
        let cfg = |proj: &str| T5Config {
            vocab_size: 8,
            d_model: 4,
            d_kv: 2,
            d_ff: 4,
            num_layers: 1,
            num_heads: 2,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: proj.into(),
        };
        assert_eq!(
            cfg("gated-gelu").feed_forward(),
            Ok((true, Activation::GeluTanh))
        );
        assert_eq!(cfg("relu").feed_forward(), Ok((false, Activation::Relu)));
        assert_eq!(cfg("gelu").feed_forward(), Ok((false, Activation::Gelu)));
        assert_eq!(
            cfg("gated-silu").feed_forward(),
            Ok((true, Activation::Silu))
        );
        assert!(cfg("gated-softmax").feed_forward().is_err());
        assert!(cfg("dense-relu").feed_forward().is_err());
    }

    #[test]
    fn float16_runs_as_bfloat16() {
        assert_eq!(run_dtype(DType::F16), DType::BF16);
        assert_eq!(run_dtype(DType::F32), DType::F32);
        assert_eq!(run_dtype(DType::BF16), DType::BF16);
    }
}
