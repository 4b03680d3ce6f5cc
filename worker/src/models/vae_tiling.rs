//! Tiled VAE encode and decode, as diffusers' `AutoencoderKL.enable_tiling()`.
//!
//! A picture larger than one tile is cut into overlapping square tiles that the encoder (or the
//! decoder) runs on one at a time, so activation memory stays at one tile's worth whatever the
//! picture's size. Each tile's output is blended linearly into its upper and left neighbours
//! over the overlap, then cropped, and the crops are stitched back together:
//!
//! ```text
//! tile size  t_in (input side), t_out (output side)     overlap factor o (0.25)
//! step       int(t_in · (1 − o))     tiles start at 0, step, 2·step, … < side
//! blend      int(t_out · o) rows/columns, weight y / blend for the tile, 1 − that for its neighbour
//! keep       the first t_out − blend rows and columns of each blended tile
//! ```
//!
//! Decoding: t_in = the latent tile, t_out = the sample tile; encoding: the other way round.
//! The result differs slightly from an untiled pass (each tile sees only its own context), but
//! matches diffusers' tiled output for the same tile sizes.

use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;

use crate::error::{Result, WorkerError};
use crate::models::config::read_json;

/// diffusers' `tile_overlap_factor`.
pub const DEFAULT_OVERLAP_FACTOR: f64 = 0.25;

/// diffusers' `AutoencoderKL` default `sample_size`, used when the config has none.
const DEFAULT_SAMPLE_SIZE: usize = 32;

/// The tile geometry of a tiled VAE (diffusers' `tile_sample_min_size`, `tile_latent_min_size`
/// and `tile_overlap_factor`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TileSizes {
    /// Side of a tile in pixels.
    sample: usize,
    /// Side of a tile in latents.
    latent: usize,
    /// Fraction of a tile that overlaps its neighbour.
    overlap_factor: f64,
}

impl TileSizes {
    /// Explicit tile sizes; an error when a tile would not advance (a step of 0) or the
    /// overlap factor is outside [0, 1).
    pub fn new(sample: usize, latent: usize, overlap_factor: f64) -> Result<Self> {
        let sizes = TileSizes {
            sample,
            latent,
            overlap_factor,
        };
        if !(0.0..1.0).contains(&overlap_factor) {
            return Err(WorkerError::Internal(format!(
                "VAE tile overlap factor {overlap_factor} is outside [0, 1)"
            )));
        }
        // A zero step would loop forever over the same tile.
        if sizes.step(sample) == 0 || sizes.step(latent) == 0 {
            return Err(WorkerError::Internal(format!(
                "VAE tiles of {sample} px / {latent} latents are too small to tile"
            )));
        }
        Ok(sizes)
    }

    /// diffusers' defaults: tiles of the VAE config's `sample_size` pixels, that divided by the
    /// VAE scale factor in latents, a quarter of overlap.
    pub fn from_sample_size(sample_size: usize, scale_factor: usize) -> Result<Self> {
        Self::new(
            sample_size,
            sample_size / scale_factor.max(1),
            DEFAULT_OVERLAP_FACTOR,
        )
    }

    /// The tile sizes diffusers derives from `vae/config.json` at `path` (its `sample_size`, an
    /// integer or a list whose first entry counts; 32 when absent).
    pub fn from_config_file(source_name: &str, path: &Path, scale_factor: usize) -> Result<Self> {
        #[derive(Deserialize)]
        struct SampleSize {
            sample_size: Option<serde_json::Value>,
        }
        let file: SampleSize = read_json(source_name, path)?;
        let value = match &file.sample_size {
            None => Some(DEFAULT_SAMPLE_SIZE as u64),
            Some(serde_json::Value::Array(sides)) => sides.first().and_then(|v| v.as_u64()),
            Some(v) => v.as_u64(),
        };
        let sample_size = value
            .and_then(|v| usize::try_from(v).ok())
            .filter(|&v| v > 0)
            .ok_or_else(|| {
                WorkerError::model_load(
                    source_name,
                    path,
                    "key 'sample_size': must be a positive integer or a list of them",
                )
            })?;
        Self::from_sample_size(sample_size, scale_factor).map_err(|e| {
            WorkerError::model_load(source_name, path, format!("key 'sample_size': {e}"))
        })
    }

    /// Side of a tile in pixels.
    pub fn sample(&self) -> usize {
        self.sample
    }

    /// Side of a tile in latents.
    pub fn latent(&self) -> usize {
        self.latent
    }

    /// `int(side · (1 − overlap))`: how far apart tiles of `side` start.
    fn step(&self, side: usize) -> usize {
        (side as f64 * (1.0 - self.overlap_factor)) as usize
    }

    /// `int(side · overlap)`: rows and columns of `side`-sized outputs blended with a neighbour.
    fn blend(&self, side: usize) -> usize {
        (side as f64 * self.overlap_factor) as usize
    }

    /// Encodes pixels (batch, 3, H, W) tile by tile with `encoder` (pixels → moments).
    pub fn encode(
        &self,
        pixels: &Tensor,
        encoder: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        tiled(
            pixels,
            Geometry {
                tile: self.sample,
                step: self.step(self.sample),
                blend: self.blend(self.latent),
                keep: self.latent - self.blend(self.latent),
            },
            encoder,
        )
    }

    /// Decodes latents (batch, C, h, w) tile by tile with `decoder` (latents → pixels).
    pub fn decode(
        &self,
        latents: &Tensor,
        decoder: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        tiled(
            latents,
            Geometry {
                tile: self.latent,
                step: self.step(self.latent),
                blend: self.blend(self.sample),
                keep: self.sample - self.blend(self.sample),
            },
            decoder,
        )
    }
}

/// One direction's tiling, in the input's units (`tile`, `step`) and the output's (`blend`, `keep`).
struct Geometry {
    tile: usize,
    step: usize,
    blend: usize,
    keep: usize,
}

/// Runs `f` on each tile of `input` and stitches the blended outputs (diffusers' tiled loops).
fn tiled(
    input: &Tensor,
    g: Geometry,
    f: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let (_, _, height, width) = input.dims4()?;
    let mut rows: Vec<Vec<Tensor>> = Vec::new();
    for top in (0..height).step_by(g.step) {
        let mut row: Vec<Tensor> = Vec::new();
        for left in (0..width).step_by(g.step) {
            let tile = input
                .narrow(2, top, g.tile.min(height - top))?
                .narrow(3, left, g.tile.min(width - left))?
                .contiguous()?;
            let mut out = f(&tile)?;
            // diffusers blends in place, so the neighbours used here are already blended.
            if let Some(above) = rows.last() {
                out = blend(&above[row.len()], &out, g.blend, 2)?;
            }
            if let Some(before) = row.last() {
                out = blend(before, &out, g.blend, 3)?;
            }
            row.push(out);
        }
        rows.push(row);
    }
    let stitched = rows
        .iter()
        .map(|row| {
            let crops = row
                .iter()
                .map(|tile| crop(tile, g.keep))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&crops, 3)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&stitched, 2)
}

/// The first `keep` rows and columns of `tile` (fewer where the tile is smaller).
fn crop(tile: &Tensor, keep: usize) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = tile.dims4()?;
    tile.narrow(2, 0, keep.min(h))?.narrow(3, 0, keep.min(w))
}

/// diffusers' `blend_v` (`dim` 2) and `blend_h` (`dim` 3): the first `extent` rows (columns)
/// of `b` become `a`'s last ones · (1 − y / extent) + `b`'s · y / extent.
fn blend(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> candle_core::Result<Tensor> {
    let extent = extent.min(a.dim(dim)?).min(b.dim(dim)?);
    if extent == 0 {
        return Ok(b.clone());
    }
    let weights: Vec<f32> = (0..extent).map(|y| y as f32 / extent as f32).collect();
    let mut shape = [1usize; 4];
    shape[dim] = extent;
    let w = Tensor::from_vec(weights, &shape[..], b.device())?.to_dtype(b.dtype())?;
    let tail = a.narrow(dim, a.dim(dim)? - extent, extent)?;
    let head = b.narrow(dim, 0, extent)?;
    let mixed = (tail.broadcast_mul(&w.affine(-1.0, 1.0)?)? + head.broadcast_mul(&w)?)?;
    let rest = b.narrow(dim, extent, b.dim(dim)? - extent)?;
    Tensor::cat(&[&mixed, &rest], dim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn blend_weights_the_neighbour_down_across_the_overlap() -> candle_core::Result<()> {
        let a = Tensor::full(1f32, (1, 1, 3, 4), &Device::Cpu)?;
        let b = Tensor::zeros((1, 1, 2, 4), DType::F32, &Device::Cpu)?;
        // extent is clamped to b's 2 rows: weights 0 and 0.5 for b.
        let out = blend(&a, &b, 4, 2)?;
        let rows: Vec<Vec<f32>> = out.squeeze(0)?.squeeze(0)?.to_vec2()?;
        assert_eq!(rows, vec![vec![1.0; 4], vec![0.5; 4]]);
        let out = blend(
            &a,
            &Tensor::zeros((1, 1, 3, 4), DType::F32, &Device::Cpu)?,
            2,
            3,
        )?;
        let rows: Vec<Vec<f32>> = out.squeeze(0)?.squeeze(0)?.to_vec2()?;
        assert_eq!(rows[0], vec![1.0, 0.5, 0.0, 0.0]);
        Ok(())
    }

    #[test]
    fn tiles_of_identity_reassemble_the_input() -> candle_core::Result<()> {
        // With f = identity every tile agrees with its neighbours, so blending changes nothing
        // and the stitched result must be the input itself, including the ragged last tiles.
        let sizes =
            TileSizes::new(8, 8, 0.25).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let input =
            Tensor::arange(0f32, 2.0 * 19.0 * 13.0, &Device::Cpu)?.reshape((1, 2, 19, 13))?;
        let out = sizes.decode(&input, |t| Ok(t.clone()))?;
        let diff = (out - &input)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }

    #[test]
    fn defaults_follow_diffusers() -> Result<()> {
        let sizes = TileSizes::from_sample_size(512, 8)?;
        assert_eq!((sizes.sample(), sizes.latent()), (512, 64));
        assert_eq!((sizes.step(64), sizes.blend(512)), (48, 128));
        assert!(TileSizes::new(1, 1, 0.25).is_err());
        assert!(TileSizes::new(32, 16, 1.0).is_err());
        Ok(())
    }
}
