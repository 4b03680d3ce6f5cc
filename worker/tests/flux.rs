//! FLUX.1 pipelines against diffusers: the tiny FLUX fixtures (`tests/fixtures/make_flux_fixtures.py`)
//! run through [`Pipeline`] as the service runs them must give diffusers' reference images
//! (`references/flux/manifest.json`: FluxPipeline dev and schnell, FluxImg2ImgPipeline,
//! FluxInpaintPipeline, FluxFillPipeline, FluxPriorReduxPipeline + FluxPipeline) within 2/255, with
//! the latents after every step pinned on the way. Also: the pieces of a FLUX model's
//! description (size multiple, schedulers, sequence length), requests FLUX refuses, a Fill
//! transformer loaded beside an ordinary model, and batching.

mod references;

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use fastfusion_proto::MaskMode;
use fastfusion_worker::backend::Backend;
use fastfusion_worker::error::WorkerError;
use fastfusion_worker::inputs::{decode, load_image, load_mask, MAX_INPUT_PIXELS};
use fastfusion_worker::lora::{AdapterFile, LoraWeight};
use fastfusion_worker::models::flux::pack_latents;
use fastfusion_worker::pipelines::{
    BatchEntry, Family, Input, LoadOptions, NoProgress, Pipeline, Progress, StrengthRule,
    TextToImage,
};
use fastfusion_worker::schedulers::SchedulerKind;
use serde::Deserialize;

use references::{fixtures, max_diff, BoxResult, TestResult, TOLERANCE};

const FLUX: &str = "references/flux";

#[derive(Debug, Clone, Deserialize)]
struct FluxCase {
    name: String,
    model: String,
    task: String,
    prompt: Option<String>,
    seed: u64,
    steps: usize,
    guidance_scale: f64,
    width: usize,
    height: usize,
    n: usize,
    max_sequence_length: usize,
    images: Vec<String>,
    image: Option<String>,
    mask: Option<String>,
    strength: Option<f64>,
    redux_image: Option<String>,
    redux_prompt: Option<String>,
    /// Not in the manifest: a test sets it to run a case with adapters.
    #[serde(skip)]
    loras: Vec<LoraWeight>,
}

impl FluxCase {
    fn request(&self) -> TextToImage {
        TextToImage {
            // A Redux case's prompt goes to the prior (`redux_prompt`); FluxPipeline gets none.
            prompt: self
                .prompt
                .clone()
                .or_else(|| self.redux_prompt.clone())
                .unwrap_or_default(),
            negative_prompt: None,
            n: self.n,
            width: self.width,
            height: self.height,
            seed: self.seed,
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            scheduler: SchedulerKind::FlowMatchEuler,
            max_sequence_length: Some(self.max_sequence_length),
            loras: self.loras.clone(),
        }
    }

    fn input_bytes(&self, file: &Option<String>) -> BoxResult<Vec<u8>> {
        let file = file.as_deref().ok_or("the case has no such input")?;
        Ok(std::fs::read(fixtures().join(FLUX).join(file))?)
    }

    /// Runs the case the way the service does (inputs decoded and sized by `inputs`).
    fn run(
        &self,
        model: &Pipeline,
        progress: &mut dyn Progress,
    ) -> BoxResult<Vec<image::RgbImage>> {
        let req = self.request();
        let (w, h) = (self.width as u32, self.height as u32);
        let image = || -> BoxResult<image::RgbImage> {
            Ok(load_image(
                &self.input_bytes(&self.image)?,
                w,
                h,
                MAX_INPUT_PIXELS,
            )?)
        };
        let strength = self.strength.ok_or("an image case without strength");
        Ok(match self.task.as_str() {
            "text2img" => model.text_to_image(&req, progress)?,
            "img2img" => model.image_to_image(&req, &image()?, strength?, progress)?,
            "inpaint" | "fill" => {
                let mask = load_mask(
                    &self.input_bytes(&self.mask)?,
                    MaskMode::Auto,
                    w,
                    h,
                    MAX_INPUT_PIXELS,
                )?;
                model.inpaint(&req, &image()?, &mask, strength?, progress)?
            }
            "redux" => {
                let picture = decode(
                    &self.input_bytes(&self.redux_image)?,
                    "image",
                    MAX_INPUT_PIXELS,
                )?
                .into_rgb8();
                model.redux_variation(&req, &picture, progress)?
            }
            other => return Err(format!("{}: unknown task {other}", self.name).into()),
        })
    }
}

fn cases() -> BoxResult<Vec<FluxCase>> {
    let text = std::fs::read_to_string(fixtures().join(FLUX).join("manifest.json"))?;
    Ok(serde_json::from_str(&text)?)
}

fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

fn options(source: &str) -> LoadOptions {
    LoadOptions::new(source, Device::Cpu, DType::F32)
}

/// The dev model with the Redux prior, as `enable_flux_redux` loads it.
fn load(model: &str) -> BoxResult<Pipeline> {
    let mut opts = options(model);
    if model == "tiny-flux-dev" {
        opts.redux = Some(model_dir("tiny-flux-redux"));
    }
    Ok(Pipeline::load(&model_dir(model), &opts)?)
}

/// Records the latents after every step.
#[derive(Default)]
struct Steps(Vec<Tensor>);

impl Progress for Steps {
    fn on_step(&mut self, _: usize, _: usize, latents: &Tensor) -> ControlFlow<()> {
        self.0.push(latents.clone());
        ControlFlow::Continue(())
    }
}

fn tensors(case: &str) -> BoxResult<HashMap<String, Tensor>> {
    let path = fixtures().join(format!("{FLUX}/tensors/{case}.safetensors"));
    Ok(candle_core::safetensors::load(path, &Device::Cpu)?)
}

fn relative_error(got: &Tensor, want: &Tensor) -> BoxResult<f32> {
    let diff = (got - want)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    let norm = want.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    Ok(diff / norm.max(1e-12))
}

/// Every case's images within 2/255 of diffusers', and its latents after each step (packed as
/// diffusers keeps them) within a relative 1e-4.
#[test]
fn every_flux_reference_case_matches_diffusers() -> TestResult {
    let cases = cases()?;
    assert_eq!(cases.len(), 9, "the manifest's cases");
    let mut models: HashMap<String, Pipeline> = HashMap::new();
    let mut failures = Vec::new();
    for case in &cases {
        if !models.contains_key(&case.model) {
            models.insert(case.model.clone(), load(&case.model)?);
        }
        let model = &models[&case.model];
        let mut steps = Steps::default();
        let images = case.run(model, &mut steps)?;
        let refs = tensors(&case.name)?;
        let want = refs.get("step_latents").ok_or("no step_latents")?;
        assert_eq!(steps.0.len(), want.dim(0)?, "{}: steps run", case.name);
        for (i, latents) in steps.0.iter().enumerate() {
            // Only the first image's latents are recorded for n = 2; compare row 0.
            let got = pack_latents(&latents.narrow(0, 0, 1)?)?;
            let err = relative_error(&got, &want.get(i)?.narrow(0, 0, 1)?)?;
            if err > 1e-4 {
                failures.push(format!("{}: step {i}: relative error {err}", case.name));
            }
        }
        assert_eq!(images.len(), case.images.len(), "{}: images", case.name);
        for (image, file) in images.iter().zip(&case.images) {
            let reference = image::open(fixtures().join(FLUX).join(file))?.to_rgb8();
            assert_eq!(image.dimensions(), reference.dimensions(), "{file}");
            let diff = max_diff(image, &reference);
            eprintln!("{}: {file}: max diff {diff}/255", case.name);
            if diff > TOLERANCE {
                failures.push(format!("{}: {file}: max diff {diff}/255", case.name));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    Ok(())
}

/// The prompt's T5 states, pooled CLIP output and embedded guidance are what diffusers fed the
/// transformer.
#[test]
fn flux_conditioning_matches_diffusers() -> TestResult {
    let model = load("tiny-flux-dev")?;
    let case = cases()?
        .into_iter()
        .find(|c| c.name == "flux_dev_t2i")
        .ok_or("no flux_dev_t2i")?;
    let refs = tensors(&case.name)?;
    let prompt = case.prompt.as_deref().ok_or("no prompt")?;
    let cond = model.conditioning(prompt, None, 1, Some(case.guidance_scale), (32, 32))?;
    let context = refs
        .get("step0.encoder_hidden_states")
        .ok_or("no context")?;
    assert_eq!(cond.context.dims(), context.dims());
    assert!(relative_error(&cond.context, context)? < 1e-5);
    let pooled = cond.pooled.as_ref().ok_or("no pooled")?;
    let want = refs.get("step0.pooled_projections").ok_or("no pooled")?;
    assert!(relative_error(pooled, want)? < 1e-5);
    let guidance = cond.guidance_embed.as_ref().ok_or("no guidance")?;
    assert_eq!(guidance.to_vec1::<f32>()?, vec![3.5]);
    // No classifier-free guidance rows.
    assert!(cond.guidance.is_none());
    Ok(())
}

#[test]
fn a_flux_model_describes_itself() -> TestResult {
    let dev = load("tiny-flux-dev")?;
    assert_eq!(dev.family(), Family::Flux);
    // The tiny VAE halves (scale factor 2): tokens are 4×4 pixels, sizes multiples of 4, the
    // description rounds up to the API's 8.
    assert_eq!(dev.size_multiple(), 4);
    assert_eq!(dev.native_size(), (256, 256));
    assert_eq!(dev.image_seq_len(32, 48), Some(8 * 12));
    assert_eq!(dev.strength_rule(), StrengthRule::Flow);
    assert_eq!(dev.default_scheduler(), SchedulerKind::FlowMatchEuler);
    let description = Backend::description(&dev);
    assert_eq!(description.family, fastfusion_proto::ModelFamily::Flux);
    assert_eq!(description.max_sequence_length, 512);
    assert!(description.redux);
    assert_eq!(description.schedule_context(32, 32).image_seq_len, Some(64));
    let fill = load("tiny-flux-fill")?;
    assert!(fill.is_inpainting_model());
    assert!(!Backend::description(&fill).redux);
    Ok(())
}

fn request(width: usize, height: usize) -> TextToImage {
    TextToImage {
        prompt: "a red circle".into(),
        negative_prompt: None,
        n: 1,
        width,
        height,
        seed: 1,
        steps: 2,
        guidance_scale: 3.5,
        scheduler: SchedulerKind::FlowMatchEuler,
        max_sequence_length: None,
        loras: Vec::new(),
    }
}

fn invalid_param(result: Result<Vec<image::RgbImage>, WorkerError>) -> String {
    match result {
        Err(WorkerError::InvalidArgument { param, .. }) => param,
        Err(other) => format!("another error: {other}"),
        Ok(_) => "no error".into(),
    }
}

#[test]
fn flux_refuses_what_it_cannot_run() -> TestResult {
    let dev = load("tiny-flux-dev")?;
    // Not a multiple of the packed token size (4 px for the tiny VAE).
    assert_eq!(
        invalid_param(dev.text_to_image(&request(34, 32), &mut NoProgress)),
        "size"
    );
    let mut long = request(32, 32);
    long.max_sequence_length = Some(513);
    assert_eq!(
        invalid_param(dev.text_to_image(&long, &mut NoProgress)),
        "max_sequence_length"
    );
    let mut discrete = request(32, 32);
    discrete.scheduler = SchedulerKind::Euler;
    assert_eq!(
        invalid_param(dev.text_to_image(&discrete, &mut NoProgress)),
        "scheduler"
    );
    // A Fill model cannot do text-to-image, like a 9-channel SD inpainting model.
    let fill = load("tiny-flux-fill")?;
    assert!(matches!(
        fill.text_to_image(&request(32, 32), &mut NoProgress),
        Err(WorkerError::TaskDisabled(_))
    ));
    // schnell has no guidance embedding and no Redux prior was loaded beside it.
    let schnell = load("tiny-flux-schnell")?;
    let picture = image::RgbImage::new(32, 32);
    assert!(matches!(
        schnell.redux_variation(&request(32, 32), &picture, &mut NoProgress),
        Err(WorkerError::TaskDisabled(_))
    ));
    Ok(())
}

/// A shorter T5 window changes the picture; the default for dev is 512 (the reference's).
#[test]
fn max_sequence_length_is_honoured() -> TestResult {
    let dev = load("tiny-flux-dev")?;
    let mut req = request(32, 32);
    let default = dev.text_to_image(&req, &mut NoProgress)?;
    req.max_sequence_length = Some(512);
    assert!(dev.text_to_image(&req, &mut NoProgress)? == default);
    req.max_sequence_length = Some(8);
    let short = dev.text_to_image(&req, &mut NoProgress)?;
    assert!(
        max_diff(&short[0], &default[0]) > 0,
        "a shorter window made no difference"
    );
    Ok(())
}

/// `edits_config.inpaint_pipeline`: the Fill transformer loaded beside the dev model runs masked
/// edits exactly as the Fill repo alone does (the fixtures share text encoders and VAE).
#[test]
fn a_fill_transformer_beside_the_base_gives_the_fill_picture() -> TestResult {
    let mut opts = options("tiny-flux-dev");
    opts.fill_transformer = Some(model_dir("tiny-flux-fill"));
    let combined = Pipeline::load(&model_dir("tiny-flux-dev"), &opts)?;
    assert!(combined.has_fill() && !combined.is_inpainting_model());
    let case = cases()?
        .into_iter()
        .find(|c| c.task == "fill")
        .ok_or("no fill case")?;
    let images = case.run(&combined, &mut NoProgress)?;
    let reference = image::open(fixtures().join(FLUX).join(&case.images[0]))?.to_rgb8();
    let diff = max_diff(&images[0], &reference);
    assert!(diff <= TOLERANCE, "max diff {diff}/255");
    // Text-to-image still runs on the ordinary transformer.
    let t2i = combined.text_to_image(&request(32, 32), &mut NoProgress)?;
    assert_eq!(t2i.len(), 1);
    Ok(())
}

/// A request's LoRA set reaches a Fill transformer beside the base as it reaches a Fill repo
/// served alone: the same adapter on the same masked edit gives the same picture both ways, and
/// one that differs from the plain edit (nothing is half-applied to the text encoders only).
#[test]
fn a_fill_transformer_beside_the_base_takes_the_requests_adapters() -> TestResult {
    let adapter = || {
        vec![AdapterFile::new(
            "flux_style",
            fixtures().join("loras/flux_style.safetensors"),
        )]
    };
    let mut opts = options("tiny-flux-dev");
    opts.fill_transformer = Some(model_dir("tiny-flux-fill"));
    opts.loras = adapter();
    let combined = Pipeline::load(&model_dir("tiny-flux-dev"), &opts)?;
    let mut alone = options("tiny-flux-fill");
    alone.loras = adapter();
    let alone = Pipeline::load(&model_dir("tiny-flux-fill"), &alone)?;
    let mut case = cases()?
        .into_iter()
        .find(|c| c.task == "fill")
        .ok_or("no fill case")?;
    let plain = case.run(&combined, &mut NoProgress)?;
    case.loras = vec![LoraWeight {
        name: "flux_style".into(),
        weight: 1.0,
    }];
    let styled = case.run(&combined, &mut NoProgress)?;
    let styled_alone = case.run(&alone, &mut NoProgress)?;
    let same = max_diff(&styled[0], &styled_alone[0]);
    assert!(same <= 1, "beside vs alone: max diff {same}/255");
    let changed = max_diff(&styled[0], &plain[0]);
    assert!(
        changed >= 8,
        "the adapter changed the Fill edit by only {changed}/255"
    );
    Ok(())
}

/// A Fill repo whose VAE is not the base's is refused, naming the part.
#[test]
fn a_fill_repo_with_another_vae_is_refused() -> TestResult {
    // Provenance keys may differ (another repo saved the same weights with another version).
    let copy = tempfile::tempdir()?;
    copy_dir(&model_dir("tiny-flux-fill"), copy.path())?;
    let config = copy.path().join("vae/config.json");
    let text = std::fs::read_to_string(&config)?.replace("\"0.42.1\"", "\"0.40.0\"");
    std::fs::write(&config, &text)?;
    let mut opts = options("tiny-flux-dev");
    opts.fill_transformer = Some(copy.path().to_path_buf());
    assert!(Pipeline::load(&model_dir("tiny-flux-dev"), &opts).is_ok());
    // A real difference is refused.
    let text = text.replace("0.3611", "0.5");
    std::fs::write(&config, text)?;
    let mut opts = options("tiny-flux-dev");
    opts.fill_transformer = Some(copy.path().to_path_buf());
    let err = Pipeline::load(&model_dir("tiny-flux-dev"), &opts)
        .err()
        .ok_or("loaded")?
        .to_string();
    assert!(err.contains("vae") && err.contains("differs"), "{err}");
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        // Fixture folders may be symlinks to shared parts: copy what they point at.
        if std::fs::metadata(entry.path())?.is_dir() {
            std::fs::create_dir_all(&target)?;
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// Two FLUX requests with different prompts and guidance scales share every transformer pass and
/// still give their own pictures.
#[test]
fn batched_flux_requests_equal_their_runs_alone() -> TestResult {
    let dev = load("tiny-flux-dev")?;
    let a = request(32, 32);
    let mut b = request(32, 32);
    b.prompt = "a blue square".into();
    b.guidance_scale = 5.0;
    b.seed = 7;
    let alone_a = dev.text_to_image(&a, &mut NoProgress)?;
    let alone_b = dev.text_to_image(&b, &mut NoProgress)?;
    let (mut pa, mut pb) = (NoProgress, NoProgress);
    let mut entries = [
        BatchEntry {
            request: &a,
            input: Input::Text,
            progress: &mut pa,
        },
        BatchEntry {
            request: &b,
            input: Input::Text,
            progress: &mut pb,
        },
    ];
    let results = dev.generate_batch(&mut entries);
    let together: Vec<Vec<image::RgbImage>> = results.into_iter().collect::<Result<_, _>>()?;
    assert!(max_diff(&together[0][0], &alone_a[0]) <= 1);
    assert!(max_diff(&together[1][0], &alone_b[0]) <= 1);
    assert!(max_diff(&alone_a[0], &alone_b[0]) > 10);
    Ok(())
}

/// `torch_dtype_run: float16` on the CPU: the transformer, CLIP and VAE run in float16, T5 (which
/// overflows in float16) and the Redux prior in float32 (the CPU has no bfloat16 matmul); the
/// pictures stay close to the float32 references.
#[test]
fn float16_keeps_t5_out_of_float16_and_stays_close() -> TestResult {
    let mut opts = options("tiny-flux-dev");
    opts.dtype = DType::F16;
    opts.init_dtype = DType::F16;
    opts.redux = Some(model_dir("tiny-flux-redux"));
    let model = Pipeline::load(&model_dir("tiny-flux-dev"), &opts)?;
    for name in ["flux_dev_t2i", "flux_redux_prompt"] {
        let case = cases()?
            .into_iter()
            .find(|c| c.name == name)
            .ok_or("no such case")?;
        let images = case.run(&model, &mut NoProgress)?;
        let reference = image::open(fixtures().join(FLUX).join(&case.images[0]))?.to_rgb8();
        let diff = max_diff(&images[0], &reference);
        eprintln!("{name}: float16 vs float32 reference: {diff}/255");
        assert!(diff <= 12, "{name}: float16 differs by {diff}/255");
    }
    Ok(())
}

/// Start-up stops naming the file and key: a Fill repo labelled as an ordinary one (and the
/// reverse), an ordinary transformer given as the Fill model beside the base, a Redux folder
/// that is not a Redux prior.
#[test]
fn mislabelled_flux_repos_are_refused_naming_the_key() -> TestResult {
    let message = |result: Result<Pipeline, WorkerError>| -> String {
        result.err().map(|e| e.to_string()).unwrap_or_default()
    };
    for (model, class) in [
        ("tiny-flux-fill", "FluxPipeline"),
        ("tiny-flux-dev", "FluxFillPipeline"),
    ] {
        let copy = tempfile::tempdir()?;
        copy_dir(&model_dir(model), copy.path())?;
        let index = copy.path().join("model_index.json");
        let text = std::fs::read_to_string(&index)?;
        let relabelled = text
            .replace("\"FluxFillPipeline\"", "\"X\"")
            .replace("\"FluxPipeline\"", "\"X\"")
            .replace("\"X\"", &format!("\"{class}\""));
        std::fs::write(&index, relabelled)?;
        let err = message(Pipeline::load(copy.path(), &options(model)));
        assert!(
            err.contains("transformer/config.json") && err.contains("in_channels"),
            "{model} as {class}: {err}"
        );
    }
    let mut opts = options("tiny-flux-dev");
    opts.fill_transformer = Some(model_dir("tiny-flux-schnell"));
    let err = message(Pipeline::load(&model_dir("tiny-flux-dev"), &opts));
    assert!(
        err.contains("in_channels") && err.contains("Fill"),
        "an ordinary transformer as the Fill model: {err}"
    );
    let mut opts = options("tiny-flux-dev");
    opts.redux = Some(model_dir("tiny-flux-schnell"));
    let err = message(Pipeline::load(&model_dir("tiny-flux-dev"), &opts));
    assert!(
        err.contains("model_index.json") && err.contains("FluxPriorReduxPipeline"),
        "a FLUX model as the Redux prior: {err}"
    );
    Ok(())
}
