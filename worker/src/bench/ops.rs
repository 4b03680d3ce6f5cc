//! `fastfusion-worker bench --mode ops`: single ops at the shapes a real model runs them, ours
//! against candle's own ops in one process (no model is loaded; `--repeat` timed runs after one
//! untimed): GroupNorm(32) + SiLU (`models::norm`) and 3×3 convolutions (`models::conv`) at SD
//! 1.5's UNet widths for 256² and 512² pictures and the SD VAE decoder's levels at 512², and
//! attention (`models::attention`, the fused CPU kernel) at SD 1.5's, the SD VAE's and FLUX's
//! attention shapes against candle's matmul, softmax and matmul over the whole score tensor, and
//! GEGLU's gate (`models::geglu`) against candle's chunk, `gelu_erf` and multiply.

use std::fmt;
use std::time::Instant;

use candle_core::{Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig};

use crate::error::Result;
use crate::models::attention::attention;
use crate::models::conv::{self, Conv, Method};
use crate::models::geglu::geglu;
use crate::models::norm::GroupNorm;

/// (label, shape) of the inputs: UNet batch 2 (guidance), VAE decode batch 1.
pub const SHAPES: &[(&str, [usize; 4])] = &[
    ("unet 256² top level", [2, 320, 32, 32]),
    ("unet 256² level 2", [2, 640, 16, 16]),
    ("unet 256² level 3", [2, 1280, 8, 8]),
    ("unet 256² level 4", [2, 1280, 4, 4]),
    ("unet 512² top level", [2, 320, 64, 64]),
    ("unet 512² level 2", [2, 640, 32, 32]),
    ("unet 512² mid level", [2, 1280, 16, 16]),
    ("vae 512² level 3", [1, 256, 256, 256]),
    ("vae 512² level 4", [1, 128, 512, 512]),
];

/// (label, [batch, heads, tokens, keys], head_dim) of one attention call: SD 1.5's top-level
/// self- and cross-attention (8 heads of 40, guidance batch 2), the SD VAE's mid-block attention
/// at 512² (one head of 512) and FLUX's joint attention at 512² (24 heads of 128, 512 text
/// tokens + 1024 image tokens).
pub const ATTENTION_SHAPES: &[(&str, [usize; 4], usize)] = &[
    ("unet 256² self-attn", [2, 8, 1024, 1024], 40),
    ("unet 512² self-attn", [2, 8, 4096, 4096], 40),
    ("unet 512² cross-attn", [2, 8, 4096, 77], 40),
    ("vae 512² attn", [1, 1, 4096, 4096], 512),
    ("flux 512² joint", [1, 24, 1536, 1536], 128),
];

/// (label, [batch, tokens, 2·inner]) of a GEGLU projection's output: SD 1.5's top level
/// (320 channels, inner 1 280) at 256² and 512², and its third level (1 280, inner 5 120) at 512².
pub const GEGLU_SHAPES: &[(&str, [usize; 3])] = &[
    ("unet 256² top level", [2, 1024, 2560]),
    ("unet 512² top level", [2, 4096, 2560]),
    ("unet 512² level 3", [2, 256, 10240]),
];

/// Starts each result line, so a driving script can find them among other output.
const MARKER: &str = "fastfusion-bench-ops";

#[derive(Debug, Clone)]
pub struct OpRow {
    pub op: &'static str,
    pub label: &'static str,
    pub shape: [usize; 4],
    pub ours_s: f64,
    pub candle_s: f64,
}

#[derive(Debug, Clone)]
pub struct OpsReport {
    pub threads: usize,
    pub repeat: usize,
    pub rows: Vec<OpRow>,
}

impl fmt::Display for OpsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "float32, CPU, {} threads, mean of {} timed runs (conv: 3x3, padding 1, c_out = c_in; \
             attention: batch, heads, tokens, keys; geglu: batch, 1, tokens, 2·inner)",
            self.threads, self.repeat
        )?;
        writeln!(
            f,
            "{:<16} {:<22} {:>20} {:>12} {:>12} {:>8}",
            "op", "case", "shape", "ours ms", "candle ms", "speed-up"
        )?;
        for r in &self.rows {
            writeln!(
                f,
                "{:<16} {:<22} {:>20} {:>12.2} {:>12.2} {:>7.1}x",
                r.op,
                r.label,
                format!("{:?}", r.shape),
                r.ours_s * 1e3,
                r.candle_s * 1e3,
                r.candle_s / r.ours_s
            )?;
        }
        for r in &self.rows {
            let [n, c, h, w] = r.shape;
            writeln!(
                f,
                "{MARKER} op={} shape={n}x{c}x{h}x{w} ours_s={:.6} candle_s={:.6}",
                r.op, r.ours_s, r.candle_s
            )?;
        }
        Ok(())
    }
}

fn mean_seconds(repeat: usize, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let started = Instant::now();
    for _ in 0..repeat {
        f()?;
    }
    Ok(started.elapsed().as_secs_f64() / repeat as f64)
}

pub fn run(repeat: usize) -> Result<OpsReport> {
    let repeat = repeat.max(1);
    let device = Device::Cpu;
    let mut rows = Vec::new();
    for &(label, shape) in SHAPES {
        let channels = shape[1];
        let x = Tensor::randn(0f32, 1.0, &shape[..], &device)?;
        let weight = Tensor::randn(1f32, 0.1, channels, &device)?;
        let bias = Tensor::randn(0f32, 0.1, channels, &device)?;
        let ours = GroupNorm::new(weight.clone(), bias.clone(), 32, 1e-5)?;
        let candle = candle_nn::GroupNorm::new(weight, bias, channels, 32, 1e-5)?;
        let ours_s = mean_seconds(repeat, &mut || {
            ours.forward_silu(&x)?;
            Ok(())
        })?;
        let candle_s = mean_seconds(repeat, &mut || {
            candle_nn::ops::silu(&candle.forward(&x)?)?;
            Ok(())
        })?;
        rows.push(OpRow {
            op: "group_norm_silu",
            label,
            shape,
            ours_s,
            candle_s,
        });
    }
    for &(label, shape) in SHAPES {
        let channels = shape[1];
        let x = Tensor::randn(0f32, 1.0, &shape[..], &device)?;
        let weight = Tensor::randn(0f32, 0.02, (channels, channels, 3, 3), &device)?;
        let bias = Tensor::randn(0f32, 0.1, channels, &device)?;
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let layer = Conv2d::new(weight.clone(), Some(bias.clone()), cfg);
        let candle_s = mean_seconds(repeat, &mut || {
            layer.forward(&x)?;
            Ok(())
        })?;
        // As a model's layer runs it: the transformed weights made on the first (untimed) call
        // and kept.
        let ours = Conv::new(layer);
        let ours_s = mean_seconds(repeat, &mut || {
            ours.forward(&x)?;
            Ok(())
        })?;
        let [n, c, h, w] = shape;
        let chosen = ours.method((n, c, h, w));
        rows.push(OpRow {
            op: chosen.name(),
            label,
            shape,
            ours_s,
            candle_s,
        });
        // Every method with its weights transformed in each call: the methods not chosen, to
        // show the choice is right, and the chosen one's saving from the cache.
        for method in Method::ALL {
            let label = match method {
                Method::Im2col if method == chosen => continue,
                _ if method == chosen => "  (weights per call)",
                _ => "  (not chosen)",
            };
            let ours_s = mean_seconds(repeat, &mut || {
                conv::conv3x3_with(&x, &weight, Some(&bias), Some(method))?;
                Ok(())
            })?;
            rows.push(OpRow {
                op: method.name(),
                label,
                shape,
                ours_s,
                candle_s,
            });
        }
    }
    for &(label, shape, head_dim) in ATTENTION_SHAPES {
        let [b, heads, tokens, keys] = shape;
        // q as the projections give it, (b, tokens, heads·head_dim) seen as (b, heads, tokens,
        // head_dim); k and v likewise.
        let operand = |tokens: usize| -> Result<Tensor> {
            Ok(
                Tensor::randn(0f32, 1.0, (b, tokens, heads * head_dim), &device)?
                    .reshape((b, tokens, heads, head_dim))?
                    .transpose(1, 2)?,
            )
        };
        let (q, k, v) = (operand(tokens)?, operand(keys)?, operand(keys)?);
        let scale = 1.0 / (head_dim as f64).sqrt();
        let ours_s = mean_seconds(repeat, &mut || {
            attention(&q, &k, &v, scale)?;
            Ok(())
        })?;
        let candle_s = mean_seconds(repeat, &mut || {
            let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
            candle_nn::ops::softmax_last_dim(&scores)?
                .matmul(&v.contiguous()?)?
                .transpose(1, 2)?
                .reshape((b, tokens, heads * head_dim))?;
            Ok(())
        })?;
        rows.push(OpRow {
            op: "attention",
            label,
            shape,
            ours_s,
            candle_s,
        });
    }
    for &(label, [b, tokens, width]) in GEGLU_SHAPES {
        let projected = Tensor::randn(0f32, 1.0, (b, tokens, width), &device)?;
        let ours_s = mean_seconds(repeat, &mut || {
            geglu(&projected)?;
            Ok(())
        })?;
        let candle_s = mean_seconds(repeat, &mut || {
            let halves = projected.chunk(2, candle_core::D::Minus1)?;
            (&halves[0] * halves[1].gelu_erf()?)?;
            Ok(())
        })?;
        rows.push(OpRow {
            op: "geglu",
            label,
            shape: [b, 1, tokens, width],
            ours_s,
            candle_s,
        });
    }
    Ok(OpsReport {
        threads: candle_core::utils::get_num_threads(),
        repeat,
        rows,
    })
}
