//! Diffusers reference cases shared by the parity test binaries: the fixture manifests
//! (`tests/fixtures/references/manifest.json` from `make_fixtures.py`, `references/sdxl/` from
//! `make_sdxl_fixtures.py`), running a case the way the service would, and comparing images.

// Each test binary that includes this module uses a different subset of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use fastfusion_proto::MaskMode;
use fastfusion_worker::inputs::{load_image, load_mask, MAX_INPUT_PIXELS};
use fastfusion_worker::pipelines::{LoadOptions, NoProgress, Pipeline, Progress, TextToImage};
use fastfusion_worker::schedulers::SchedulerKind;
use serde::Deserialize;

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Largest allowed per-channel difference from the reference, in 8-bit steps.
pub const TOLERANCE: u8 = 2;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

#[derive(Debug, Clone, Deserialize)]
pub struct Case {
    pub name: String,
    pub model: String,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub seed: u64,
    pub steps: usize,
    pub guidance_scale: f64,
    pub scheduler: String,
    pub width: usize,
    pub height: usize,
    pub n: usize,
    pub images: Vec<String>,
    /// `img2img` or `inpaint`; absent for text-to-image.
    pub task: Option<String>,
    /// Input image and masks, relative to `references/`.
    pub image: Option<String>,
    pub mask: Option<String>,
    pub mask_rgba: Option<String>,
    pub strength: Option<f64>,
    /// The folder the manifest and its PNGs are in (set when the manifest is read).
    #[serde(skip)]
    pub dir: PathBuf,
}

impl Case {
    pub fn request(&self) -> Result<TextToImage, String> {
        Ok(TextToImage {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            n: self.n,
            width: self.width,
            height: self.height,
            seed: self.seed,
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            scheduler: SchedulerKind::from_name(&self.scheduler)
                .ok_or_else(|| format!("{}: unknown scheduler {}", self.name, self.scheduler))?,
            max_sequence_length: None,
            loras: Vec::new(),
        })
    }
}

pub type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

pub fn reference_bytes(file: &str) -> BoxResult<Vec<u8>> {
    Ok(std::fs::read(fixtures().join("references").join(file))?)
}

impl Case {
    /// Runs the case on `model` the way the service would: inputs through `inputs`, the mask
    /// `mask_file` read with `mode`.
    pub fn run(
        &self,
        model: &Pipeline,
        mask_file: Option<&str>,
        mode: MaskMode,
        progress: &mut dyn Progress,
    ) -> BoxResult<Vec<image::RgbImage>> {
        let req = self.request()?;
        let (w, h) = (self.width as u32, self.height as u32);
        let image = || -> BoxResult<image::RgbImage> {
            let file = self.image.as_deref().ok_or("edit case without image")?;
            Ok(load_image(&reference_bytes(file)?, w, h, MAX_INPUT_PIXELS)?)
        };
        let strength = || self.strength.ok_or("edit case without strength");
        Ok(match self.task.as_deref() {
            None => model.text_to_image(&req, progress)?,
            Some("img2img") => model.image_to_image(&req, &image()?, strength()?, progress)?,
            Some("inpaint") => {
                let file = mask_file.ok_or("inpaint case without mask")?;
                let mask = load_mask(&reference_bytes(file)?, mode, w, h, MAX_INPUT_PIXELS)?;
                model.inpaint(&req, &image()?, &mask, strength()?, progress)?
            }
            Some(other) => return Err(format!("{}: unknown task {other}", self.name).into()),
        })
    }
}

/// The SD 1.x/2.x cases.
pub fn manifest() -> BoxResult<Vec<Case>> {
    manifest_in("references")
}

/// The cases of the manifest in `references_dir` (relative to the fixtures), each knowing where
/// its PNGs are.
pub fn manifest_in(references_dir: &str) -> BoxResult<Vec<Case>> {
    let dir = fixtures().join(references_dir);
    let text = std::fs::read_to_string(dir.join("manifest.json"))?;
    let mut cases: Vec<Case> = serde_json::from_str(&text)?;
    for case in &mut cases {
        case.dir = dir.clone();
    }
    Ok(cases)
}

/// A case's reference PNG `file`.
pub fn reference_image(case: &Case, file: &str) -> BoxResult<image::RgbImage> {
    Ok(image::open(case.dir.join(file))?.to_rgb8())
}

pub fn load(model: &str) -> Result<Pipeline, Box<dyn std::error::Error>> {
    load_as(model, DType::F32)
}

pub fn load_as(model: &str, dtype: DType) -> Result<Pipeline, Box<dyn std::error::Error>> {
    let opts = LoadOptions {
        device: Device::Cpu,
        dtype,
        init_dtype: dtype,
        cpu_offload: false,
        source_name: model.to_owned(),
        vae_tiling: false,
        fill_transformer: None,
        redux: None,
        loras: Vec::new(),
    };
    Ok(Pipeline::load(
        &fixtures().join("models").join(model),
        &opts,
    )?)
}

/// Largest per-channel difference between two images of the same size.
pub fn max_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

/// The intermediate tensors diffusers saved for some cases.
pub fn tensors(case: &str) -> BoxResult<HashMap<String, Tensor>> {
    tensors_in("references", case)
}

/// The tensors saved for `case` under `references_dir/tensors/`.
pub fn tensors_in(references_dir: &str, case: &str) -> BoxResult<HashMap<String, Tensor>> {
    let path = fixtures().join(format!("{references_dir}/tensors/{case}.safetensors"));
    Ok(candle_core::safetensors::load(path, &Device::Cpu)?)
}

pub fn get<'a>(map: &'a HashMap<String, Tensor>, key: &str) -> Result<&'a Tensor, String> {
    map.get(key)
        .ok_or_else(|| format!("tensor fixture has no {key}"))
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32, candle_core::Error> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// Runs every case on its model (loaded once, float32) and returns one line per image off by
/// more than [`TOLERANCE`]; RGBA masks must give the very picture their grey twin gives.
pub fn check_cases(cases: &[Case]) -> BoxResult<Vec<String>> {
    let mut models: HashMap<String, Pipeline> = HashMap::new();
    let mut failures = Vec::new();
    for case in cases {
        if !models.contains_key(&case.model) {
            models.insert(case.model.clone(), load(&case.model)?);
        }
        let model = &models[&case.model];
        let images = case.run(model, case.mask.as_deref(), MaskMode::Auto, &mut NoProgress)?;
        if let Some(rgba) = &case.mask_rgba {
            // The OpenAI reading of the same mask must give the very same picture.
            let again = case.run(model, Some(rgba), MaskMode::Auto, &mut NoProgress)?;
            assert!(
                again == images,
                "{}: the RGBA mask gives another picture",
                case.name
            );
            let forced = case.run(model, Some(rgba), MaskMode::Alpha, &mut NoProgress)?;
            assert!(forced == images, "{}: mask_mode alpha differs", case.name);
        }
        assert_eq!(
            images.len(),
            case.images.len(),
            "{}: image count",
            case.name
        );
        for (image, file) in images.iter().zip(&case.images) {
            let reference = reference_image(case, file)?;
            if image.dimensions() != reference.dimensions() {
                failures.push(format!(
                    "{}: {file}: size {:?}, reference {:?}",
                    case.name,
                    image.dimensions(),
                    reference.dimensions()
                ));
                continue;
            }
            let diff = max_diff(image, &reference);
            eprintln!("{}: {file}: max diff {diff}/255", case.name);
            if diff > TOLERANCE {
                failures.push(format!("{}: {file}: max diff {diff}/255", case.name));
            }
        }
    }
    Ok(failures)
}
