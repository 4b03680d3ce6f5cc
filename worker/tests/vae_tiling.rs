//! Tiled VAE decode and encode against diffusers' `AutoencoderKL.enable_tiling()` on the tiny
//! SD 1.5 VAE, with the tiles shrunk to 32 px / 16 latents so that 96x80 pictures really tile
//! (references from tests/fixtures/make_vae_tiling_refs.py), plus the slicing guarantee.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use fastfusion_worker::models::config::{read_json, VaeConfigFile};
use fastfusion_worker::models::vae::Vae;
use fastfusion_worker::models::vae_tiling::TileSizes;
use fastfusion_worker::models::weights::load_var_builder;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Two 8-bit levels on the [-1, 1] scale the VAE works in would be 4/255; this is stricter.
const PIXEL_TOLERANCE: f32 = 2.0 / 255.0;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn vae_dir() -> PathBuf {
    fixtures().join("models/tiny-sd15/vae")
}

/// The tiny SD 1.5 VAE in float32 on the CPU, with `tiling`.
fn load_vae(tiling: Option<TileSizes>) -> Result<Vae, Box<dyn std::error::Error>> {
    let dir = vae_dir();
    let file: VaeConfigFile = read_json("tiny-sd15", &dir.join("config.json"))?;
    let spec = file.to_spec("tiny-sd15", &dir.join("config.json"))?;
    let vb = load_var_builder(
        "tiny-sd15",
        &dir,
        "diffusion_pytorch_model",
        DType::F32,
        &Device::Cpu,
    )?;
    let mut vae = Vae::new(vb, spec.in_channels, spec.out_channels, &spec.candle)?;
    vae.set_tiling(tiling);
    Ok(vae)
}

/// The tile sizes the reference script sets on diffusers' VAE.
fn small_tiles() -> Result<TileSizes, Box<dyn std::error::Error>> {
    Ok(TileSizes::new(32, 16, 0.25)?)
}

fn refs() -> Result<HashMap<String, Tensor>, Box<dyn std::error::Error>> {
    Ok(candle_core::safetensors::load(
        fixtures().join("vae_tiling/refs.safetensors"),
        &Device::Cpu,
    )?)
}

fn get<'a>(refs: &'a HashMap<String, Tensor>, name: &str) -> &'a Tensor {
    refs.get(name)
        .unwrap_or_else(|| panic!("refs.safetensors has no {name}"))
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32, Box<dyn std::error::Error>> {
    assert_eq!(a.dims(), b.dims());
    Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?)
}

#[test]
fn tiled_decode_matches_diffusers() -> TestResult {
    let refs = refs()?;
    let latents = get(&refs, "decode_latents");
    let expected = get(&refs, "decode_tiled");
    // The reference must really be tiled, or this test could not tell tiling from no tiling.
    assert!(max_diff(expected, get(&refs, "decode_untiled"))? > 0.1);

    let tiled = load_vae(Some(small_tiles()?))?.decode(latents)?;
    assert_eq!(tiled.dims(), &[1, 3, 96, 80]);
    let diff = max_diff(&tiled, expected)?;
    assert!(diff <= PIXEL_TOLERANCE, "tiled decode is {diff} off");

    let untiled = load_vae(None)?.decode(latents)?;
    let diff = max_diff(&untiled, get(&refs, "decode_untiled"))?;
    assert!(diff <= PIXEL_TOLERANCE, "untiled decode is {diff} off");
    Ok(())
}

#[test]
fn tiled_encode_matches_diffusers() -> TestResult {
    let refs = refs()?;
    let pixels = get(&refs, "encode_pixels");
    let expected = get(&refs, "encode_mean_tiled");
    assert!(max_diff(expected, get(&refs, "encode_mean_untiled"))? > 0.01);

    let dist = load_vae(Some(small_tiles()?))?.encode(pixels)?;
    assert_eq!(dist.mean.dims(), &[1, 4, 32, 48]);
    let diff = max_diff(&dist.mean, expected)?;
    assert!(diff <= 1e-3, "tiled mean is {diff} off");
    let diff = max_diff(&dist.std, get(&refs, "encode_std_tiled"))?;
    assert!(diff <= 1e-3, "tiled std is {diff} off");
    Ok(())
}

#[test]
fn pictures_within_one_tile_are_not_tiled() -> TestResult {
    // 16x16 latents fit one 16-latent tile: the output must be the untiled decoder's, exactly.
    let refs = refs()?;
    let latents = get(&refs, "decode_latents")
        .narrow(2, 0, 16)?
        .narrow(3, 0, 16)?;
    let tiled = load_vae(Some(small_tiles()?))?.decode(&latents)?;
    let untiled = load_vae(None)?.decode(&latents)?;
    assert_eq!(max_diff(&tiled, &untiled)?, 0.0);
    Ok(())
}

#[test]
fn a_batch_decodes_as_its_images_alone() -> TestResult {
    // Slicing: a batch of two must give exactly what each image gives decoded on its own, tiled
    // or not.
    let refs = refs()?;
    let first = get(&refs, "decode_latents").clone();
    let second = first.flip(&[2])?.affine(0.5, 0.1)?.contiguous()?;
    let batch = Tensor::cat(&[&first, &second], 0)?;
    for tiling in [None, Some(small_tiles()?)] {
        let vae = load_vae(tiling)?;
        let together = vae.decode(&batch)?;
        assert_eq!(
            max_diff(&together.narrow(0, 0, 1)?, &vae.decode(&first)?)?,
            0.0
        );
        assert_eq!(
            max_diff(&together.narrow(0, 1, 1)?, &vae.decode(&second)?)?,
            0.0
        );
    }
    Ok(())
}

#[test]
fn default_tiles_come_from_the_vae_config() -> TestResult {
    // The tiny VAE says sample_size 64 and halves the resolution once: 64 px / 32 latents.
    let tiles = TileSizes::from_config_file("tiny-sd15", &vae_dir().join("config.json"), 2)?;
    assert_eq!((tiles.sample(), tiles.latent()), (64, 32));
    Ok(())
}
