//! SDXL, SDXL-Turbo and SD-Turbo against diffusers: the tiny SDXL-family fixtures
//! (`tests/fixtures/make_sdxl_fixtures.py`) must produce diffusers' reference images within
//! 2/255, with the conditioning (two encoders' penultimate states, pooled embeddings, time ids)
//! and the latents after each step pinned on the way. Also: the pooled/time-id path visibly
//! changes the UNet's prediction, batching keeps SDXL requests identical to runs alone, float16
//! keeps the VAE in float32, and broken SDXL repos fail to load naming the file and key.

mod references;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use fastfusion_proto::MaskMode;
use fastfusion_worker::error::WorkerError;
use fastfusion_worker::models::config::{read_json, UNetConfigFile};
use fastfusion_worker::models::unet::{AddedConditions, UNet};
use fastfusion_worker::pipelines::{
    BatchEntry, Family, Input, LoadOptions, NoProgress, Pipeline, Progress,
};
use references::*;

const SDXL: &str = "references/sdxl";

fn sdxl_cases() -> BoxResult<Vec<Case>> {
    manifest_in(SDXL)
}

fn case(cases: &[Case], name: &str) -> BoxResult<Case> {
    Ok(cases
        .iter()
        .find(|c| c.name == name)
        .ok_or_else(|| format!("the SDXL manifest has no {name}"))?
        .clone())
}

#[test]
fn every_sdxl_reference_case_matches_diffusers() -> TestResult {
    let cases = sdxl_cases()?;
    // Text-to-image (with and without negatives, three schedulers, n = 2, non-square, no CFG,
    // long prompt, latent statistics), Turbo-like one-step cases, image-to-image and inpainting
    // with 4- and 9-channel UNets.
    assert!(cases.len() >= 20, "{} cases", cases.len());
    let failures = check_cases(&cases)?;
    assert!(
        failures.is_empty(),
        "images differ from diffusers:\n{}",
        failures.join("\n")
    );
    Ok(())
}

#[test]
fn sdxl_conditioning_matches_diffusers() -> TestResult {
    let cases = sdxl_cases()?;
    let model = load("tiny-sdxl")?;
    assert_eq!(model.family(), Family::Sdxl);
    for name in ["sdxl_euler", "sdxl_euler_negative", "sdxl_euler_96x64"] {
        let c = case(&cases, name)?;
        let saved = tensors_in(SDXL, name)?;
        let cond = model.conditioning(
            &c.prompt,
            c.negative_prompt.as_deref(),
            c.n,
            Some(c.guidance_scale),
            (c.height, c.width),
        )?;
        let diff = max_abs_diff(&cond.context, get(&saved, "prompt_embeds")?)?;
        assert!(diff < 1e-5, "{name}: prompt_embeds differ by {diff}");
        let pooled = cond.pooled.as_ref().ok_or("no pooled embeddings")?;
        let diff = max_abs_diff(pooled, get(&saved, "add_text_embeds")?)?;
        assert!(diff < 1e-5, "{name}: add_text_embeds differ by {diff}");
        let time_ids = cond.time_ids.as_ref().ok_or("no time ids")?;
        let diff = max_abs_diff(time_ids, get(&saved, "add_time_ids")?)?;
        assert_eq!(diff, 0.0, "{name}: add_time_ids");
    }
    // No negative prompt: zero negatives (force_zeros_for_empty_prompt), whatever "" encodes to.
    let c = case(&cases, "sdxl_euler")?;
    let cond = model.conditioning(&c.prompt, None, 1, Some(5.0), (64, 64))?;
    let negative = cond.context.get(0)?.abs()?.sum_all()?.to_scalar::<f32>()?;
    assert_eq!(negative, 0.0);
    let empty = model.conditioning(&c.prompt, Some(""), 1, Some(5.0), (64, 64))?;
    assert!(empty.context.get(0)?.abs()?.sum_all()?.to_scalar::<f32>()? > 1.0);
    Ok(())
}

/// Latents after each step, for the text-to-image and edit cases diffusers saved them for.
#[test]
fn sdxl_steps_match_the_saved_latents() -> TestResult {
    let cases = sdxl_cases()?;
    for name in [
        "sdxl_euler_negative",
        "sdxl_turbo_1step",
        "img2img_sdxl_euler_s075",
        "inpaint9_sdxl_euler_s075",
    ] {
        let c = case(&cases, name)?;
        let saved = tensors_in(SDXL, name)?;
        let model = load(&c.model)?;
        let mut steps = AllLatents::default();
        c.run(&model, c.mask.as_deref(), MaskMode::Auto, &mut steps)?;
        let expected = get(&saved, "step_latents")?;
        assert_eq!(steps.0.len(), expected.dim(0)?, "{name}: steps run");
        for (i, ours) in steps.0.iter().enumerate() {
            let theirs = expected.get(i)?;
            // The fixture UNet's gains make latents of magnitude 10-70: compare relatively.
            let scale = theirs
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?
                .max(1.0);
            let diff = max_abs_diff(ours, &theirs)? / scale;
            eprintln!("{name}: step {i}: max diff {diff:.2e} of the largest latent");
            assert!(
                diff < 2e-4,
                "{name}: latents after step {i} differ by {diff}"
            );
        }
    }
    Ok(())
}

/// Keeps the latents of every step.
#[derive(Default)]
struct AllLatents(Vec<Tensor>);

impl Progress for AllLatents {
    fn on_step(&mut self, _: usize, _: usize, latents: &Tensor) -> ControlFlow<()> {
        self.0.push(latents.clone());
        ControlFlow::Continue(())
    }
}

fn relative_change(a: &Tensor, b: &Tensor) -> BoxResult<f32> {
    let delta = (a - b)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    let norm = a.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    Ok(delta / norm)
}

/// The fixture UNet's addition embedding is strong enough that a loader ignoring it (as candle's
/// SDXL example does) could not match the references: zeroing the pooled embeddings or changing
/// the size ids moves the prediction by a large fraction.
#[test]
fn pooled_embeddings_and_time_ids_change_the_prediction() -> TestResult {
    let dir = fixtures().join("models/tiny-sdxl/unet");
    let file: UNetConfigFile = read_json("tiny-sdxl", &dir.join("config.json"))?;
    let spec = file.to_spec("tiny-sdxl", &dir.join("config.json"))?;
    let weights = candle_core::safetensors::load(
        dir.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )?;
    let unet = UNet::new(
        VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu),
        &spec,
    )?;
    assert!(unet.needs_added_conditions());
    let d = &Device::Cpu;
    let latents = Tensor::randn(0f32, 1.0, (1, 4, 32, 32), d)?;
    let context = Tensor::randn(0f32, 1.0, (1, 77, 64), d)?;
    let pooled = Tensor::randn(0f32, 1.0, (1, 32), d)?;
    let ids = Tensor::new(&[[64f32, 64., 0., 0., 64., 64.]], d)?;
    let predict = |pooled: &Tensor, ids: &Tensor| {
        unet.forward(
            &latents,
            500.0,
            &context,
            Some(AddedConditions {
                text_embeds: pooled,
                time_ids: ids,
            }),
        )
    };
    let base = predict(&pooled, &ids)?;
    let no_pooled = predict(&pooled.zeros_like()?, &ids)?;
    let other_size = predict(
        &pooled,
        &Tensor::new(&[[128f32, 96., 0., 0., 64., 64.]], d)?,
    )?;
    let (a, b) = (
        relative_change(&base, &no_pooled)?,
        relative_change(&base, &other_size)?,
    );
    eprintln!("prediction change: pooled zeroed {a:.3}, original size changed {b:.3}");
    assert!(a > 0.05 && b > 0.05, "pooled {a}, time ids {b}");
    // And the UNet refuses to run without them.
    assert!(unet.forward(&latents, 500.0, &context, None).is_err());
    Ok(())
}

/// Two SDXL requests denoised in one batch (different prompts, seeds and guidance) give what
/// each gives alone, and still match diffusers.
#[test]
fn batched_sdxl_requests_equal_their_runs_alone() -> TestResult {
    let cases = sdxl_cases()?;
    let a = case(&cases, "sdxl_euler_negative")?;
    let mut b = case(&cases, "sdxl_euler")?;
    b.seed = 7;
    b.guidance_scale = 3.0;
    let model = load("tiny-sdxl")?;
    let (ra, rb) = (a.request()?, b.request()?);
    let alone_a = model.text_to_image(&ra, &mut NoProgress)?;
    let alone_b = model.text_to_image(&rb, &mut NoProgress)?;
    let (mut pa, mut pb) = (NoProgress, NoProgress);
    let mut entries = [
        BatchEntry {
            request: &ra,
            input: Input::Text,
            progress: &mut pa,
        },
        BatchEntry {
            request: &rb,
            input: Input::Text,
            progress: &mut pb,
        },
    ];
    let mut results = model.generate_batch(&mut entries);
    let batched_b = results.pop().ok_or("no result")??;
    let batched_a = results.pop().ok_or("no result")??;
    assert!(max_diff(&batched_a[0], &alone_a[0]) <= 1);
    assert!(max_diff(&batched_b[0], &alone_b[0]) <= 1);
    let reference = reference_image(&a, &a.images[0])?;
    assert!(max_diff(&batched_a[0], &reference) <= TOLERANCE);
    Ok(())
}

/// float16 on the CPU: the UNet and encoders run in float16, the VAE (force_upcast) in float32;
/// the picture stays close to the float32 reference.
#[test]
fn float16_keeps_the_vae_in_float32_and_stays_close() -> TestResult {
    let cases = sdxl_cases()?;
    let c = case(&cases, "sdxl_euler")?;
    let model = load_as("tiny-sdxl", DType::F16)?;
    let images = model.text_to_image(&c.request()?, &mut NoProgress)?;
    let diff = max_diff(&images[0], &reference_image(&c, &c.images[0])?);
    eprintln!("float16 vs float32 reference: {diff}/255");
    assert!(diff <= 12, "float16 differs by {diff}/255");
    Ok(())
}

fn options(source: &str) -> LoadOptions {
    LoadOptions {
        device: Device::Cpu,
        dtype: DType::F32,
        init_dtype: DType::F32,
        cpu_offload: false,
        source_name: source.to_owned(),
        vae_tiling: false,
        fill_transformer: None,
        redux: None,
        loras: Vec::new(),
    }
}

/// A copy of tiny-sdxl in a temp dir whose parts are symlinks, except those `edit` changes.
fn broken_copy(edit: impl FnOnce(&Path) -> std::io::Result<()>) -> BoxResult<tempfile::TempDir> {
    let source = fixtures().join("models/tiny-sdxl");
    let dir = tempfile::tempdir()?;
    for entry in std::fs::read_dir(&source)? {
        let entry = entry?;
        std::os::unix::fs::symlink(entry.path(), dir.path().join(entry.file_name()))?;
    }
    edit(dir.path())?;
    Ok(dir)
}

/// Replaces the symlink `part/config.json`'s folder with a real one whose config is edited.
fn edit_config(
    root: &Path,
    part: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> std::io::Result<()> {
    let source = fixtures().join("models/tiny-sdxl").join(part);
    let folder = root.join(part);
    std::fs::remove_file(&folder)?;
    std::fs::create_dir(&folder)?;
    for entry in std::fs::read_dir(&source)? {
        let entry = entry?;
        if entry.file_name() != "config.json" {
            std::os::unix::fs::symlink(entry.path(), folder.join(entry.file_name()))?;
        }
    }
    let text = std::fs::read_to_string(source.join("config.json"))?;
    let mut config: serde_json::Value = serde_json::from_str(&text)?;
    edit(&mut config);
    std::fs::write(folder.join("config.json"), config.to_string())
}

fn load_error(dir: &Path) -> BoxResult<(PathBuf, String)> {
    match Pipeline::load(dir, &options("broken-sdxl")) {
        Err(WorkerError::ModelLoad { file, message, .. }) => Ok((file, message)),
        Err(other) => Err(format!("expected a ModelLoad error, got {other}").into()),
        Ok(_) => Err("a broken repo loaded".into()),
    }
}

#[test]
fn broken_sdxl_repos_name_the_file_and_key() -> TestResult {
    // text_encoder_2 absent.
    let dir = broken_copy(|d| std::fs::remove_file(d.join("text_encoder_2")))?;
    let (file, message) = load_error(dir.path())?;
    assert_eq!(
        file,
        dir.path().join("text_encoder_2/config.json"),
        "{message}"
    );

    // projection_class_embeddings_input_dim not matching 6 time ids × 8 + 32.
    let dir = broken_copy(|d| {
        edit_config(d, "unet", |c| {
            c["projection_class_embeddings_input_dim"] = 88.into();
        })
    })?;
    let (file, message) = load_error(dir.path())?;
    assert_eq!(file, dir.path().join("unet/config.json"));
    assert!(
        message.contains("projection_class_embeddings_input_dim") && message.contains("80"),
        "{message}"
    );

    // A UNet without the addition embedding in an SDXL repo.
    let dir = broken_copy(|d| {
        edit_config(d, "unet", |c| {
            c["addition_embed_type"] = serde_json::Value::Null;
        })
    })?;
    let (_, message) = load_error(dir.path())?;
    assert!(message.contains("addition_embed_type"), "{message}");

    // LCM-style UNets are refused by name until supported.
    let dir = broken_copy(|d| {
        edit_config(d, "unet", |c| {
            c["time_cond_proj_dim"] = 256.into();
        })
    })?;
    let (_, message) = load_error(dir.path())?;
    assert!(message.contains("time_cond_proj_dim"), "{message}");

    // An unsupported pipeline class is named, with the supported ones.
    let dir = broken_copy(|d| {
        std::fs::remove_file(d.join("model_index.json"))?;
        std::fs::write(
            d.join("model_index.json"),
            r#"{"_class_name": "StableCascadeDecoderPipeline"}"#,
        )
    })?;
    let (file, message) = load_error(dir.path())?;
    assert_eq!(file, dir.path().join("model_index.json"));
    assert!(
        message.contains("StableCascadeDecoderPipeline")
            && message.contains("StableDiffusionXLPipeline"),
        "{message}"
    );
    Ok(())
}

#[test]
fn turbo_models_read_their_own_schedule_and_size() -> TestResult {
    let turbo = load("tiny-sdxl-turbo")?;
    assert_eq!(
        turbo.default_scheduler(),
        fastfusion_worker::schedulers::SchedulerKind::EulerAncestral
    );
    assert_eq!(turbo.native_size(), (64, 64));
    let sd_turbo = load("tiny-sd-turbo")?;
    assert_eq!(sd_turbo.family(), Family::Sd2);
    Ok(())
}

#[derive(Debug, serde::Deserialize)]
struct TokenCase {
    text: String,
    input_ids: Vec<u32>,
}

/// tokenizer_2 (vocab.json + merges.txt, "!" padding) encodes like transformers.
#[test]
fn the_second_tokenizer_matches_transformers() -> TestResult {
    let text = std::fs::read_to_string(fixtures().join("references/sdxl/tokens.json"))?;
    let cases: Vec<TokenCase> = serde_json::from_str(&text)?;
    assert!(!cases.is_empty());
    let tokenizer = fastfusion_worker::models::tokenizer::ClipTokenizer::load(
        "tiny-sdxl",
        &fixtures().join("models/tiny-sdxl/tokenizer_2"),
        77,
    )?;
    for case in &cases {
        assert_eq!(
            tokenizer.encode(&case.text)?,
            case.input_ids,
            "{:?}",
            case.text
        );
    }
    Ok(())
}
