//! FLUX's 2×2 latent packing and its position ids, exactly as diffusers' FluxPipeline does them.
//!
//! ```text
//! latents (B, C, h, w) ── pack ──▶ tokens (B, (h/2)·(w/2), 4C)   token = row-major 2×2 patch,
//!                                                                  channel = c·4 + dy·2 + dx
//! image ids (rows·cols, 3) = [0, row, col] for the packed grid; text ids (S, 3) = zeros
//! ```
//! `h` and `w` are latent sizes (`2·(height // (2·vae_scale_factor))` for an image of height ×
//! width); both must be even.

use candle_core::{DType, Device, Tensor};

use crate::models::config::divides;

/// `_pack_latents`: (B, C, h, w) → (B, (h/2)(w/2), 4C).
pub fn pack_latents(latents: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = latents.dims4()?;
    even(h, w)?;
    latents
        .reshape(&[b, c, h / 2, 2, w / 2, 2][..])?
        .permute([0, 2, 4, 1, 3, 5])?
        .reshape((b, (h / 2) * (w / 2), c * 4))
}

/// `_unpack_latents`: (B, (h/2)(w/2), 4C) → (B, C, h, w) for latent height `h` and width `w`.
pub fn unpack_latents(packed: &Tensor, h: usize, w: usize) -> candle_core::Result<Tensor> {
    let (b, tokens, channels) = packed.dims3()?;
    even(h, w)?;
    if tokens != (h / 2) * (w / 2) || !channels.is_multiple_of(4) {
        candle_core::bail!(
            "cannot unpack {tokens} tokens of {channels} channels into {h}x{w} latents"
        );
    }
    packed
        .reshape(&[b, h / 2, w / 2, channels / 4, 2, 2][..])?
        .permute([0, 3, 1, 4, 2, 5])?
        .reshape((b, channels / 4, h, w))
}

/// FluxFillPipeline's mask channels: a binarized pixel mask (B, 1, h·s, w·s) (1 = repaint) becomes
/// (B, s², h, w) — pixel (y·s + i, x·s + j) in channel i·s + j — packed to (B, (h/2)(w/2), 4s²).
pub fn pack_fill_mask(mask: &Tensor, vae_scale_factor: usize) -> candle_core::Result<Tensor> {
    pack_latents(&fill_mask_channels(mask, vae_scale_factor)?)
}

/// The unpacked half of [`pack_fill_mask`]: (B, 1, h·s, w·s) → (B, s², h, w), the layout the
/// pipeline's loop keeps next to the latents.
pub fn fill_mask_channels(mask: &Tensor, vae_scale_factor: usize) -> candle_core::Result<Tensor> {
    let (b, _, height, width) = mask.dims4()?;
    let s = vae_scale_factor;
    if !divides(s, height) || !divides(s, width) {
        candle_core::bail!("a {height}x{width} mask is not a multiple of the VAE scale factor {s}");
    }
    let (h, w) = (height / s, width / s);
    mask.narrow(1, 0, 1)?
        .reshape(&[b, h, s, w, s][..])?
        .permute([0, 2, 4, 1, 3])?
        .reshape((b, s * s, h, w))
}

/// `_prepare_latent_image_ids(batch, rows, cols)`: (rows·cols, 3) float32 `[0, row, col]`, row-major,
/// for the packed token grid (`rows` = latent height / 2, `cols` = latent width / 2).
pub fn image_ids(rows: usize, cols: usize, device: &Device) -> candle_core::Result<Tensor> {
    let ids: Vec<f32> = (0..rows)
        .flat_map(|r| (0..cols).flat_map(move |c| [0.0, r as f32, c as f32]))
        .collect();
    Tensor::from_vec(ids, (rows * cols, 3), device)
}

/// Text position ids: (seq_len, 3) zeros.
pub fn text_ids(seq_len: usize, device: &Device) -> candle_core::Result<Tensor> {
    Tensor::zeros((seq_len, 3), DType::F32, device)
}

fn even(h: usize, w: usize) -> candle_core::Result<()> {
    if !h.is_multiple_of(2) || !w.is_multiple_of(2) {
        candle_core::bail!("latent size {h}x{w} must be even to pack 2x2 patches");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_patch_becomes_one_token_channel_major() -> candle_core::Result<()> {
        // (1, 2, 2, 4): channel c, pixel (y, x) holds 100c + 10y + x.
        let values: Vec<f32> = (0..2)
            .flat_map(|c| {
                (0..2).flat_map(move |y| (0..4).map(move |x| (100 * c + 10 * y + x) as f32))
            })
            .collect();
        let latents = Tensor::from_vec(values, (1, 2, 2, 4), &Device::Cpu)?;
        let packed = pack_latents(&latents)?;
        assert_eq!(packed.dims(), &[1, 2, 8]);
        let tokens = packed.to_vec3::<f32>()?;
        // Token 1 = the patch at columns 2..4: channel 0 (dy, dx) then channel 1.
        assert_eq!(tokens[0][1], vec![2., 3., 12., 13., 102., 103., 112., 113.]);
        let back = unpack_latents(&packed, 2, 4)?;
        assert_eq!(
            back.flatten_all()?.to_vec1::<f32>()?,
            latents.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }
}
