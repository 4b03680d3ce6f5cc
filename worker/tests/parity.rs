//! Parity with diffusers: the tiny fixture models must produce diffusers' reference images.
//!
//! Reads `tests/fixtures/references/manifest.json` (written by `tests/fixtures/make_fixtures.py`),
//! loads each fixture model once (float32, CPU), runs every case, and requires every pixel within
//! 2/255 of diffusers' PNG. Smaller checks pin the stages on the way (token ids, prompt
//! embeddings, initial noise, latents after each step) so a failure says where the pipelines
//! diverge. Image-to-image and inpainting cases (`task` in the manifest) decode their inputs
//! through `fastfusion_worker::inputs` as the service does, and inpainting cases with an
//! OpenAI-style RGBA mask must give the same picture with it as with the grey mask.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use fastfusion_proto::MaskMode;
use fastfusion_worker::inputs::{load_image, load_mask, MAX_INPUT_PIXELS};
use fastfusion_worker::models::tokenizer::ClipTokenizer;
use fastfusion_worker::pipelines::stable_diffusion::{
    LoadOptions, NoProgress, Progress, StableDiffusion, Stage, TextToImage,
};
use fastfusion_worker::rng::TorchRng;
use fastfusion_worker::schedulers::SchedulerKind;
use serde::Deserialize;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Largest allowed per-channel difference from the reference, in 8-bit steps.
const TOLERANCE: u8 = 2;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

#[derive(Debug, Clone, Deserialize)]
struct Case {
    name: String,
    model: String,
    prompt: String,
    negative_prompt: Option<String>,
    seed: u64,
    steps: usize,
    guidance_scale: f64,
    scheduler: String,
    width: usize,
    height: usize,
    n: usize,
    images: Vec<String>,
    /// `img2img` or `inpaint`; absent for text-to-image.
    task: Option<String>,
    /// Input image and masks, relative to `references/`.
    image: Option<String>,
    mask: Option<String>,
    mask_rgba: Option<String>,
    strength: Option<f64>,
}

impl Case {
    fn request(&self) -> Result<TextToImage, String> {
        Ok(TextToImage {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone().unwrap_or_default(),
            n: self.n,
            width: self.width,
            height: self.height,
            seed: self.seed,
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            scheduler: SchedulerKind::from_name(&self.scheduler)
                .ok_or_else(|| format!("{}: unknown scheduler {}", self.name, self.scheduler))?,
        })
    }
}

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

fn reference_bytes(file: &str) -> BoxResult<Vec<u8>> {
    Ok(std::fs::read(fixtures().join("references").join(file))?)
}

impl Case {
    /// Runs the case on `model` the way the service would: inputs through `inputs`, the mask
    /// `mask_file` read with `mode`.
    fn run(
        &self,
        model: &StableDiffusion,
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

fn manifest() -> Result<Vec<Case>, Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(fixtures().join("references/manifest.json"))?;
    Ok(serde_json::from_str(&text)?)
}

fn load(model: &str) -> Result<StableDiffusion, Box<dyn std::error::Error>> {
    load_as(model, DType::F32)
}

fn load_as(model: &str, dtype: DType) -> Result<StableDiffusion, Box<dyn std::error::Error>> {
    let opts = LoadOptions {
        device: Device::Cpu,
        dtype,
        source_name: model.to_owned(),
        vae_tiling: false,
    };
    Ok(StableDiffusion::load(
        &fixtures().join("models").join(model),
        &opts,
    )?)
}

/// Largest per-channel difference between two images of the same size.
fn max_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

#[test]
fn every_reference_case_matches_diffusers() -> TestResult {
    let cases = manifest()?;
    assert!(!cases.is_empty(), "the manifest lists no cases");
    let mut models: HashMap<String, StableDiffusion> = HashMap::new();
    let mut failures = Vec::new();
    for case in &cases {
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
            let reference = image::open(fixtures().join("references").join(file))?.to_rgb8();
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
    assert!(
        failures.is_empty(),
        "images differ from diffusers:\n{}",
        failures.join("\n")
    );
    Ok(())
}

#[derive(Debug, Deserialize)]
struct TokenCase {
    model: String,
    text: String,
    input_ids: Vec<u32>,
}

#[test]
fn tokenizers_match_transformers() -> TestResult {
    let text = std::fs::read_to_string(fixtures().join("references/tokens.json"))?;
    let cases: Vec<TokenCase> = serde_json::from_str(&text)?;
    let mut tokenizers: HashMap<String, ClipTokenizer> = HashMap::new();
    let mut failures = Vec::new();
    for case in &cases {
        if !tokenizers.contains_key(&case.model) {
            let dir = fixtures()
                .join("models")
                .join(&case.model)
                .join("tokenizer");
            tokenizers.insert(
                case.model.clone(),
                ClipTokenizer::load(&case.model, &dir, 77)?,
            );
        }
        let ids = tokenizers[&case.model].encode(&case.text)?;
        if ids != case.input_ids {
            failures.push(format!(
                "{} {:?}:\n  ours   {:?}\n  theirs {:?}",
                case.model, case.text, ids, case.input_ids
            ));
        }
    }
    // Both tokenizer sources are covered: tokenizer.json (tiny-sd15), vocab + merges (tiny-sd2-v).
    for model in ["tiny-sd15", "tiny-sd2-v"] {
        assert!(
            tokenizers.contains_key(model),
            "tokens.json has no {model} case"
        );
    }
    assert!(
        failures.is_empty(),
        "token ids differ:\n{}",
        failures.join("\n")
    );
    Ok(())
}

/// The intermediate tensors diffusers saved for some cases.
fn tensors(case: &str) -> Result<HashMap<String, Tensor>, Box<dyn std::error::Error>> {
    let path = fixtures().join(format!("references/tensors/{case}.safetensors"));
    Ok(candle_core::safetensors::load(path, &Device::Cpu)?)
}

fn get<'a>(map: &'a HashMap<String, Tensor>, key: &str) -> Result<&'a Tensor, String> {
    map.get(key)
        .ok_or_else(|| format!("tensor fixture has no {key}"))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32, candle_core::Error> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

#[test]
fn stages_match_the_saved_tensors() -> TestResult {
    let cases = manifest()?;
    let mut models: HashMap<String, StableDiffusion> = HashMap::new();
    for name in ["sd15_euler_negative", "sd15_euler_ancestral", "sd2v_ddim"] {
        let case = cases
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| format!("manifest has no {name}"))?;
        let saved = tensors(name)?;
        if !models.contains_key(&case.model) {
            models.insert(case.model.clone(), load(&case.model)?);
        }
        let model = &models[&case.model];

        // Token ids: row 0 is the negative prompt, row 1 the prompt.
        let dir = fixtures()
            .join("models")
            .join(&case.model)
            .join("tokenizer");
        let tokenizer = ClipTokenizer::load(&case.model, &dir, 77)?;
        let negative = case.negative_prompt.clone().unwrap_or_default();
        let ours: Vec<Vec<u32>> = vec![
            tokenizer.encode(&negative)?,
            tokenizer.encode(&case.prompt)?,
        ];
        let theirs: Vec<Vec<u32>> = get(&saved, "input_ids")?.to_dtype(DType::U32)?.to_vec2()?;
        assert_eq!(ours, theirs, "{name}: input_ids");

        // Prompt embeddings, in the same row order.
        let embeds = model.encode_prompt(&case.prompt, &negative, case.n, true)?;
        let diff = max_abs_diff(&embeds, get(&saved, "prompt_embeds")?)?;
        assert!(diff < 1e-4, "{name}: prompt_embeds differ by {diff}");

        // The first draw of the generator.
        let noise = get(&saved, "initial_noise")?;
        let ours = TorchRng::new(case.seed).randn_tensor(noise.dims(), &Device::Cpu, DType::F32)?;
        let diff = max_abs_diff(&ours, noise)?;
        assert!(diff < 1e-5, "{name}: initial_noise differs by {diff}");

        // The latents the loop ends with, caught through the progress callback.
        let mut last = LastLatents(None);
        model.text_to_image(&case.request()?, &mut last)?;
        let latents = last.0.ok_or("no step was reported")?;
        let diff = max_abs_diff(&latents, get(&saved, "final_latents")?)?;
        eprintln!("{name}: final latents max diff {diff}");
        // Exact-GELU UNet: about 1e-4 here; the tanh approximation alone gives 1.4e-3.
        assert!(diff < 5e-4, "{name}: final_latents differ by {diff}");
    }
    Ok(())
}

/// Image-to-image and inpainting stop where diffusers does: as many steps as the strength leaves
/// (the manifest's `timesteps`), and the same latents after each of them.
#[test]
fn edit_steps_match_the_saved_tensors() -> TestResult {
    let cases = manifest()?;
    let mut models: HashMap<String, StableDiffusion> = HashMap::new();
    for name in [
        "img2img_sd15_euler_s075",
        "img2img_sd2v_ddim_s060",
        "inpaint_sd15_euler_s060",
        "inpaint9_euler_s075",
    ] {
        let case = cases
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| format!("manifest has no {name}"))?;
        let saved = tensors(name)?;
        if !models.contains_key(&case.model) {
            models.insert(case.model.clone(), load(&case.model)?);
        }
        let mut steps = AllLatents::default();
        case.run(
            &models[&case.model],
            case.mask.as_deref(),
            MaskMode::Auto,
            &mut steps,
        )?;
        let expected = get(&saved, "step_latents")?;
        assert_eq!(steps.0.len(), expected.dim(0)?, "{name}: steps run");
        assert!(
            steps.1.iter().all(|&t| t == steps.0.len()),
            "{name}: totals"
        );
        for (i, ours) in steps.0.iter().enumerate() {
            let diff = max_abs_diff(ours, &expected.get(i)?)?;
            assert!(
                diff < 5e-4,
                "{name}: latents after step {i} differ by {diff}"
            );
        }
    }
    Ok(())
}

/// Each image of a batch decodes to what its latents give alone. Batched VAE decoding once gave
/// the second image of a two-image inpaint up to 12/255 off (diffusers' references were matched
/// only by image 0); the latents here are those of that request.
#[test]
fn every_image_of_a_batch_decodes_as_it_would_alone() -> TestResult {
    let cases = manifest()?;
    let case = cases
        .iter()
        .find(|c| c.name == "inpaint_sd15_euler_s100")
        .ok_or("manifest has no inpaint_sd15_euler_s100")?;
    let model = load(&case.model)?;
    let mut two = case.clone();
    two.n = 2;
    let mut last = LastLatents(None);
    let images = two.run(&model, two.mask.as_deref(), MaskMode::Auto, &mut last)?;
    let latents = last.0.ok_or("no step was reported")?;
    for (i, image) in images.iter().enumerate() {
        let alone = model.decode(&latents.narrow(0, i, 1)?)?;
        assert_eq!(max_diff(image, &alone[0]), 0, "image {i} of the batch");
    }
    // And image 0 of the batch is the single-image reference (same noise for image 0).
    let reference = image::open(fixtures().join("references").join(&case.images[0]))?.to_rgb8();
    assert!(max_diff(&images[0], &reference) <= TOLERANCE);
    Ok(())
}

/// Keeps the latents of every step, and the totals reported.
#[derive(Default)]
struct AllLatents(Vec<Tensor>, Vec<usize>);

impl Progress for AllLatents {
    fn on_step(&mut self, _: usize, total: usize, latents: &Tensor) -> ControlFlow<()> {
        self.0.push(latents.clone());
        self.1.push(total);
        ControlFlow::Continue(())
    }
}

/// Keeps the latents of the last step.
struct LastLatents(Option<Tensor>);

impl Progress for LastLatents {
    fn on_step(&mut self, _: usize, _: usize, latents: &Tensor) -> ControlFlow<()> {
        self.0 = Some(latents.clone());
        ControlFlow::Continue(())
    }
}

/// Cancels after the first step.
struct CancelAfterFirst(usize);

impl Progress for CancelAfterFirst {
    fn on_step(&mut self, step: usize, _: usize, _: &Tensor) -> ControlFlow<()> {
        self.0 = step;
        ControlFlow::Break(())
    }
}

/// Records the stages reported, in order, and the steps seen meanwhile.
#[derive(Default)]
struct StageLog(Vec<(Stage, usize)>, usize);

impl Progress for StageLog {
    fn on_step(&mut self, _: usize, _: usize, _: &Tensor) -> ControlFlow<()> {
        self.1 += 1;
        ControlFlow::Continue(())
    }

    fn on_stage(&mut self, stage: Stage, took: std::time::Duration) {
        assert!(took > std::time::Duration::ZERO, "{stage:?} took no time");
        self.0.push((stage, self.1));
    }
}

#[test]
fn stages_are_reported_in_order_around_the_steps() -> TestResult {
    let model = load("tiny-sd15")?;
    let mut log = StageLog::default();
    model.text_to_image(&small_request(1), &mut log)?;
    assert_eq!(
        log.0,
        [
            (Stage::EncodePrompt, 0),
            (Stage::Denoise, 2),
            (Stage::Decode, 2)
        ]
    );
    Ok(())
}

fn small_request(seed: u64) -> TextToImage {
    TextToImage {
        prompt: "a photo of the moon".into(),
        negative_prompt: String::new(),
        n: 1,
        width: 32,
        height: 32,
        seed,
        steps: 2,
        guidance_scale: 7.5,
        scheduler: SchedulerKind::EulerAncestral,
    }
}

#[test]
fn a_seed_reproduces_its_image_and_another_seed_does_not() -> TestResult {
    let model = load("tiny-sd15")?;
    let first = model.text_to_image(&small_request(3), &mut NoProgress)?;
    let again = model.text_to_image(&small_request(3), &mut NoProgress)?;
    let other = model.text_to_image(&small_request(4), &mut NoProgress)?;
    assert_eq!(first, again);
    assert!(
        max_diff(&first[0], &other[0]) > TOLERANCE,
        "seeds 3 and 4 gave the same image"
    );
    Ok(())
}

#[test]
fn sizes_and_cancellation_are_checked() -> TestResult {
    let model = load("tiny-sd2-v")?;
    assert_eq!(model.size_multiple(), 2);
    assert_eq!(model.native_size(), (64, 64));
    assert_eq!(model.default_scheduler(), SchedulerKind::Ddim);
    assert_eq!(model.max_prompt_tokens(), 75);
    let odd = TextToImage {
        width: 33,
        ..small_request(1)
    };
    match model.text_to_image(&odd, &mut NoProgress) {
        Err(fastfusion_worker::error::WorkerError::InvalidArgument { param, .. }) => {
            assert_eq!(param, "size")
        }
        other => panic!("expected an invalid size error, got {other:?}"),
    }
    // 66 px is 33 latents: the UNet's upsampler must land on the odd skip size, not on 32 or 34.
    let odd_latents = TextToImage {
        width: 66,
        ..small_request(1)
    };
    let images = model.text_to_image(&odd_latents, &mut NoProgress)?;
    assert_eq!(images[0].dimensions(), (66, 32));
    let mut cancel = CancelAfterFirst(0);
    match model.text_to_image(&small_request(1), &mut cancel) {
        Err(fastfusion_worker::error::WorkerError::Cancelled) => assert_eq!(cancel.0, 1),
        other => panic!("expected cancellation, got {other:?}"),
    }
    Ok(())
}

#[test]
fn half_precision_stays_close_to_float32() -> TestResult {
    // The UNet, VAE and text encoder run in float16; latents and scheduler math stay float32.
    let request = TextToImage {
        width: 64,
        height: 64,
        steps: 3,
        ..small_request(5)
    };
    let full = load("tiny-sd2-v")?.text_to_image(&request, &mut NoProgress)?;
    let half = load_as("tiny-sd2-v", DType::F16)?.text_to_image(&request, &mut NoProgress)?;
    let diff = max_diff(&full[0], &half[0]);
    assert!(diff <= 8, "float16 differs from float32 by {diff}/255");
    Ok(())
}

#[test]
fn a_directory_without_a_model_is_a_model_load_error() {
    let opts = LoadOptions {
        device: Device::Cpu,
        dtype: DType::F32,
        source_name: "not-a-model".to_owned(),
        vae_tiling: false,
    };
    let dir = fixtures().join("models");
    match StableDiffusion::load(&dir, &opts) {
        Err(fastfusion_worker::error::WorkerError::ModelLoad {
            source_name, file, ..
        }) => {
            assert_eq!(source_name, "not-a-model");
            assert_eq!(file, dir.join("text_encoder/config.json"));
        }
        other => panic!(
            "expected a ModelLoad error, got {:?}",
            other.map(|m| m.family())
        ),
    }
}
