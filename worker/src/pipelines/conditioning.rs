//! What a family's prompt encoding hands the denoising loop.
//!
//! Every tensor is batch-first with one row per denoiser input row, in diffusers' order:
//! `[uncond×n; cond×n]` with classifier-free guidance, `cond×n` without. Rows of several requests
//! concatenate ([`Conditioning::cat`]), which is how dynamic batching shares one forward pass.

use candle_core::Tensor;

use crate::error::{Result, WorkerError};

/// One request's conditioning (or a batch's, after [`Conditioning::cat`]).
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// (rows, seq, dim) in the run dtype: the text states cross-attention (SD, SDXL) or the joint
    /// attention (FLUX, T5 states) reads.
    pub context: Tensor,
    /// (rows, dim): SDXL's pooled text embedding (`text_embeds` of the addition embedding), FLUX's
    /// pooled CLIP prompt (`pooled_projections`).
    pub pooled: Option<Tensor>,
    /// (rows, k): SDXL's time ids (original size, crop top-left, target size).
    pub time_ids: Option<Tensor>,
    /// (rows,) float32: the guidance scale FLUX dev embeds as an input (it runs no
    /// classifier-free guidance, so each row may carry its own request's scale).
    pub guidance_embed: Option<Tensor>,
    /// The classifier-free guidance scale when it runs (the rows are then doubled). Meaningless
    /// on a concatenation of several requests, which is `None`.
    pub guidance: Option<f64>,
}

impl Conditioning {
    /// Text states only (SD 1.x/2.x).
    pub fn text(context: Tensor, guidance: Option<f64>) -> Self {
        Conditioning {
            context,
            pooled: None,
            time_ids: None,
            guidance_embed: None,
            guidance,
        }
    }

    /// Rows this conditioning has: one per denoiser input row.
    pub fn rows(&self) -> Result<usize> {
        Ok(self.context.dim(0)?)
    }

    /// The rows of every request, in order, for one shared forward pass. All parts must agree on
    /// which tensors they carry and on their widths (the engine batches only requests of one
    /// model and one size).
    pub fn cat(parts: &[&Conditioning]) -> Result<Conditioning> {
        if let [one] = parts {
            return Ok(Conditioning {
                guidance: None,
                ..(*one).clone()
            });
        }
        let contexts: Vec<&Tensor> = parts.iter().map(|c| &c.context).collect();
        Ok(Conditioning {
            context: Tensor::cat(&contexts, 0)?,
            pooled: cat_optional(parts, "pooled", |c| c.pooled.as_ref())?,
            time_ids: cat_optional(parts, "time_ids", |c| c.time_ids.as_ref())?,
            guidance_embed: cat_optional(parts, "an embedded guidance", |c| {
                c.guidance_embed.as_ref()
            })?,
            guidance: None,
        })
    }
}

/// Concatenates one optional part of every conditioning: all or none must have it.
fn cat_optional(
    parts: &[&Conditioning],
    what: &str,
    get: impl Fn(&Conditioning) -> Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let present: Vec<&Tensor> = parts.iter().filter_map(|c| get(c)).collect();
    match present.len() {
        0 => Ok(None),
        n if n == parts.len() => Ok(Some(Tensor::cat(&present, 0)?)),
        _ => Err(WorkerError::Internal(format!(
            "a batch mixes requests with and without {what}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rows_of_several_requests_concatenate_in_order() -> Result<()> {
        let d = &Device::Cpu;
        let a = Conditioning {
            pooled: Some(Tensor::zeros((2, 3), candle_core::DType::F32, d)?),
            ..Conditioning::text(
                Tensor::zeros((2, 4, 5), candle_core::DType::F32, d)?,
                Some(7.5),
            )
        };
        let b = Conditioning {
            pooled: Some(Tensor::ones((1, 3), candle_core::DType::F32, d)?),
            ..Conditioning::text(Tensor::ones((1, 4, 5), candle_core::DType::F32, d)?, None)
        };
        let both = Conditioning::cat(&[&a, &b])?;
        assert_eq!(both.rows()?, 3);
        assert_eq!(both.guidance, None);
        let pooled = both
            .pooled
            .ok_or_else(|| WorkerError::Internal("no pooled".into()))?;
        assert_eq!(pooled.sum_all()?.to_scalar::<f32>()?, 3.0);
        let plain = Conditioning::text(Tensor::zeros((1, 4, 5), candle_core::DType::F32, d)?, None);
        assert!(Conditioning::cat(&[&a, &plain]).is_err());
        Ok(())
    }
}
