//! The transformer's conditioning vector and its rotary position table.
//!
//! * `temb = timestep_embedder(sinusoid(t·1000)) [+ guidance_embedder(sinusoid(g·1000))]
//!   + text_embedder(pooled)`: diffusers' `CombinedTimestep(Guidance)TextProjEmbeddings`, each
//!   embedder `Linear → SiLU → Linear`, sinusoids of 256 channels with cosines first.
//! * RoPE (`FluxPosEmbed`, theta 10000): each of the 3 id columns rotates its own slice
//!   (`axes_dims_rope`) of every head; angles are computed in float64 on the host, as diffusers does,
//!   and handed to the attention as float32 cos/sin tables of (tokens, head_dim / 2).

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use super::layers::{linear, Linear};

/// Channels of the sinusoidal timestep projection (`Timesteps(num_channels=256)`).
const TIME_CHANNELS: usize = 256;
/// RoPE base frequency.
const THETA: f64 = 10_000.0;

/// `TimestepEmbedding` / `PixArtAlphaTextProjection(act_fn="silu")`: `linear_2(silu(linear_1(x)))`.
#[derive(Debug, Clone)]
pub struct Mlp2 {
    linear_1: Linear,
    linear_2: Linear,
}

impl Mlp2 {
    pub fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            linear_1: linear(in_dim, out_dim, vb.pp("linear_1"))?,
            linear_2: linear(out_dim, out_dim, vb.pp("linear_2"))?,
        })
    }
}

impl Module for Mlp2 {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(xs)?.silu()?)
    }
}

/// `get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)` for (B,) values,
/// in float32: frequencies `exp(-ln(10000) · i / 128)`, then `[cos(t·f), sin(t·f)]`.
pub fn timestep_sinusoids(t: &Tensor) -> candle_core::Result<Tensor> {
    let half = TIME_CHANNELS / 2;
    let ln_period = -(10_000f64.ln() as f32);
    // torch: `-log(max_period) * arange(half, float32)` in float32, then `/ half`, then `exp`.
    let freqs: Vec<f32> = (0..half)
        .map(|i| (ln_period * i as f32 / half as f32).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    Tensor::cat(&[args.cos()?, args.sin()?], 1)
}

/// The (tokens, head_dim / 2) float32 cos and sin tables for position ids (tokens, 3).
pub fn rope_tables(
    ids: &Tensor,
    axes_dims: &[usize],
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let ids = ids
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .to_vec2::<f32>()?;
    let half: usize = axes_dims.iter().sum::<usize>() / 2;
    let mut cos = Vec::with_capacity(ids.len() * half);
    let mut sin = Vec::with_capacity(ids.len() * half);
    // Per axis: `1 / theta^(2k / dim)` in float64 (diffusers' freqs_dtype on CPU and CUDA).
    let freqs: Vec<Vec<f64>> = axes_dims
        .iter()
        .map(|&dim| {
            (0..dim / 2)
                .map(|k| 1.0 / THETA.powf((2 * k) as f64 / dim as f64))
                .collect()
        })
        .collect();
    for row in &ids {
        for (axis, axis_freqs) in freqs.iter().enumerate() {
            let position = f64::from(row.get(axis).copied().unwrap_or(0.0));
            for f in axis_freqs {
                let angle = position * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
    }
    let n = ids.len();
    Ok((
        Tensor::from_vec(cos, (n, half), device)?,
        Tensor::from_vec(sin, (n, half), device)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinusoids_put_cosines_first() -> candle_core::Result<()> {
        let t = Tensor::new(&[0f32, 500.0], &Device::Cpu)?;
        let emb = timestep_sinusoids(&t)?.to_vec2::<f32>()?;
        assert_eq!(emb[0].len(), TIME_CHANNELS);
        // t = 0: every cosine 1, every sine 0.
        assert!(emb[0][..128].iter().all(|&c| c == 1.0));
        assert!(emb[0][128..].iter().all(|&s| s == 0.0));
        // Frequency 0 is 1: cos(500), sin(500).
        assert!((emb[1][0] - 500f32.cos()).abs() < 1e-6);
        assert!((emb[1][128] - 500f32.sin()).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn rope_axes_rotate_their_own_slices() -> candle_core::Result<()> {
        let ids = Tensor::new(&[[0f32, 0., 0.], [0., 2., 3.]], &Device::Cpu)?;
        let (cos, sin) = rope_tables(&ids, &[4, 6, 6], &Device::Cpu)?;
        assert_eq!(cos.dims(), &[2, 8]);
        let (cos, sin) = (cos.to_vec2::<f32>()?, sin.to_vec2::<f32>()?);
        assert!(cos[0].iter().all(|&c| c == 1.0) && sin[0].iter().all(|&s| s == 0.0));
        // Axis 0 (2 entries) has position 0; axis 1 starts at entry 2 with frequency 1: angle 2.
        assert_eq!(&cos[1][..2], &[1.0, 1.0]);
        assert_eq!(sin[1][2], 2f64.sin() as f32);
        // Axis 2 starts at entry 5: angle 3.
        assert_eq!(sin[1][5], 3f64.sin() as f32);
        Ok(())
    }
}
