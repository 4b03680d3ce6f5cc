//! FLUX components against diffusers and transformers, one by one.
//!
//! Reads `tests/fixtures/references/flux/components/` (written by
//! `tests/fixtures/make_flux_fixtures.py`, float32 on CPU) and the tiny FLUX repos in
//! `tests/fixtures/models/`. Tolerances (relative to the reference tensor's largest magnitude)
//! are stated where they are used; all come from float32 rounding differences (candle and torch
//! order their sums differently, torch's vectorised exp/sin/tanh differ from libm's by an ulp), so
//! they sit one to two orders of magnitude above the errors seen and far below what any real mistake
//! (a swapped chunk, a missing gain path, a wrong RoPE axis) produces.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use fastfusion_worker::error::WorkerError;
use fastfusion_worker::models::clip::ClipTextTransformer;
use fastfusion_worker::models::config::{read_json, ClipTextConfig};
use fastfusion_worker::models::flux::{
    image_ids, pack_fill_mask, pack_latents, text_ids, unpack_latents, FluxTransformer,
    FluxTransformerConfig, FluxVariant,
};
use fastfusion_worker::models::redux::FluxRedux;
use fastfusion_worker::models::t5::{self, T5Encoder};
use fastfusion_worker::models::t5_tokenizer::T5Tokenizer;
use fastfusion_worker::models::tokenizer::ClipTokenizer;
use fastfusion_worker::models::weights;
use fastfusion_worker::rng::TorchRng;
use fastfusion_worker::schedulers::{ScheduleContext, SchedulerConfig, SchedulerKind};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

fn components(name: &str) -> Result<HashMap<String, Tensor>, Box<dyn std::error::Error>> {
    let path = fixtures()
        .join("references/flux/components")
        .join(format!("{name}.safetensors"));
    Ok(candle_core::safetensors::load(path, &Device::Cpu)?)
}

fn get<'a>(map: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    map.get(key)
        .unwrap_or_else(|| panic!("reference tensor '{key}' is committed"))
}

/// Largest |got - want| over the reference's largest magnitude.
fn relative_error(got: &Tensor, want: &Tensor) -> Result<f32, Box<dyn std::error::Error>> {
    assert_eq!(got.dims(), want.dims(), "shapes");
    let got = got.to_dtype(DType::F32)?;
    let want = want.to_dtype(DType::F32)?;
    let diff = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = want.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
    Ok(diff / scale)
}

fn assert_close(got: &Tensor, want: &Tensor, tolerance: f32, what: &str) -> TestResult {
    let err = relative_error(got, want)?;
    assert!(
        err <= tolerance,
        "{what}: relative error {err:e} > {tolerance:e}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Transformer

/// Transformer outputs: 2 double + 2 single blocks, float32. Observed 0.7e-6 (schnell) to 3.4e-6
/// (Fill); 2e-5 leaves room for other CPUs' summation orders.
const TRANSFORMER_TOLERANCE: f32 = 2e-5;

fn check_transformer(model: &str, reference: &str) -> TestResult {
    let refs = components(reference)?;
    let dir = model_dir(model).join("transformer");
    let model = FluxTransformer::load(model, &dir, DType::F32, &Device::Cpu)?;
    let guidance = refs.get("guidance");
    assert_eq!(guidance.is_some(), model.config().guidance_embeds);
    let out = model.forward(
        get(&refs, "img"),
        get(&refs, "img_ids"),
        get(&refs, "txt"),
        get(&refs, "txt_ids"),
        get(&refs, "timestep"),
        guidance,
        get(&refs, "pooled"),
    )?;
    assert_close(&out, get(&refs, "output"), TRANSFORMER_TOLERANCE, reference)
}

#[test]
fn dev_transformer_matches_diffusers() -> TestResult {
    // Sharded weights (3 shards + index), guidance embedding.
    check_transformer("tiny-flux-dev", "transformer_dev")
}

#[test]
fn schnell_transformer_matches_diffusers() -> TestResult {
    check_transformer("tiny-flux-schnell", "transformer_schnell")
}

#[test]
fn fill_transformer_matches_diffusers() -> TestResult {
    check_transformer("tiny-flux-fill", "transformer_fill")
}

#[test]
fn conditioning_paths_all_move_the_output() -> TestResult {
    // The references would not catch a dropped input if it did not matter: check each one does.
    let refs = components("transformer_dev")?;
    let dir = model_dir("tiny-flux-dev").join("transformer");
    let model = FluxTransformer::load("tiny-flux-dev", &dir, DType::F32, &Device::Cpu)?;
    let run = |timestep: &Tensor, guidance: &Tensor, pooled: &Tensor, txt: &Tensor| {
        model.forward(
            get(&refs, "img"),
            get(&refs, "img_ids"),
            txt,
            get(&refs, "txt_ids"),
            timestep,
            Some(guidance),
            pooled,
        )
    };
    let (t, g, p, x) = (
        get(&refs, "timestep"),
        get(&refs, "guidance"),
        get(&refs, "pooled"),
        get(&refs, "txt"),
    );
    let base = run(t, g, p, x)?;
    let changed = [
        ("timestep", run(&(t * 0.5)?, g, p, x)?),
        ("guidance", run(t, &(g * 0.5)?, p, x)?),
        ("pooled", run(t, g, &p.neg()?, x)?),
        ("text", run(t, g, p, &x.neg()?)?),
    ];
    for (what, out) in changed {
        let err = relative_error(&out, &base)?;
        assert!(err > 0.05, "{what} moves the output by only {err}");
    }
    Ok(())
}

#[test]
fn guidance_must_match_the_model() -> TestResult {
    let refs = components("transformer_schnell")?;
    let dir = model_dir("tiny-flux-schnell").join("transformer");
    let model = FluxTransformer::load("tiny-flux-schnell", &dir, DType::F32, &Device::Cpu)?;
    let guidance = Tensor::new(&[3.5f32, 3.5], &Device::Cpu)?;
    let err = model
        .forward(
            get(&refs, "img"),
            get(&refs, "img_ids"),
            get(&refs, "txt"),
            get(&refs, "txt_ids"),
            get(&refs, "timestep"),
            Some(&guidance),
            get(&refs, "pooled"),
        )
        .expect_err("schnell has no guidance embedding");
    assert!(err.to_string().contains("no guidance embedding"), "{err}");
    Ok(())
}

#[test]
fn packing_matches_diffusers() -> TestResult {
    let refs = components("packing")?;
    let latents = get(&refs, "latents");
    let packed = pack_latents(latents)?;
    assert_eq!(
        packed.flatten_all()?.to_vec1::<f32>()?,
        get(&refs, "packed").flatten_all()?.to_vec1::<f32>()?
    );
    let (_, _, h, w) = latents.dims4()?;
    let back = unpack_latents(&packed, h, w)?;
    assert_eq!(
        back.flatten_all()?.to_vec1::<f32>()?,
        latents.flatten_all()?.to_vec1::<f32>()?
    );
    assert_eq!(
        image_ids(2, 3, &Device::Cpu)?.to_vec2::<f32>()?,
        get(&refs, "img_ids_2x3").to_vec2::<f32>()?
    );
    // The transformer references' ids: a 4 x 6 grid.
    let transformer = components("transformer_dev")?;
    assert_eq!(
        image_ids(4, 6, &Device::Cpu)?.to_vec2::<f32>()?,
        get(&transformer, "img_ids").to_vec2::<f32>()?
    );
    assert_eq!(
        text_ids(7, &Device::Cpu)?.to_vec2::<f32>()?,
        get(&transformer, "txt_ids").to_vec2::<f32>()?
    );
    Ok(())
}

#[test]
fn fill_mask_channels_match_diffusers() -> TestResult {
    // What FluxFillPipeline fed its transformer at the first step: latents (64), masked-image
    // latents (64), then the packed mask (4 s^2 = 16), from the committed 32x32 mask (binarized).
    let refs = candle_core::safetensors::load(
        fixtures().join("references/flux/tensors/flux_fill.safetensors"),
        &Device::Cpu,
    )?;
    let fed = get(&refs, "step0.hidden_states");
    let mask = image::open(fixtures().join("references/flux/inputs/mask_32x32.png"))?.to_luma8();
    let binary: Vec<f32> = mask
        .pixels()
        .map(|p| if p.0[0] >= 128 { 1.0 } else { 0.0 })
        .collect();
    let mask = Tensor::from_vec(binary, (1, 1, 32, 32), &Device::Cpu)?;
    let packed = pack_fill_mask(&mask, 2)?;
    assert_eq!(packed.dims(), &[1, 64, 16]);
    assert_eq!(
        packed.flatten_all()?.to_vec1::<f32>()?,
        fed.narrow(2, 128, 16)?.flatten_all()?.to_vec1::<f32>()?
    );
    Ok(())
}

#[test]
fn transformer_kinds_are_told_apart_by_width() -> TestResult {
    // The tiny VAE: 16 latent channels, scale factor 2.
    let kind = |model: &str| -> Result<FluxVariant, WorkerError> {
        let path = model_dir(model).join("transformer/config.json");
        Ok(FluxTransformerConfig::load(model, &path)?.variant(16, 2))
    };
    assert_eq!(kind("tiny-flux-dev")?, FluxVariant::Base);
    assert_eq!(kind("tiny-flux-schnell")?, FluxVariant::Base);
    assert_eq!(kind("tiny-flux-fill")?, FluxVariant::Fill);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Loading errors

/// Copies the files of directory `from` into `to`.
fn copy_into(from: &Path, to: &Path) -> TestResult {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        std::fs::copy(entry.path(), to.join(entry.file_name()))?;
    }
    Ok(())
}

/// Copies a fixture component directory into a temporary one the test may damage.
fn copy_dir(from: &Path) -> Result<tempfile::TempDir, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    copy_into(from, dir.path())?;
    Ok(dir)
}

fn model_load_error(err: WorkerError) -> (PathBuf, String) {
    match err {
        WorkerError::ModelLoad { file, message, .. } => (file, message),
        other => panic!("expected a ModelLoad error, got {other:?}"),
    }
}

#[test]
fn a_missing_shard_is_named() -> TestResult {
    let dir = copy_dir(&model_dir("tiny-flux-dev").join("transformer"))?;
    let shard = dir
        .path()
        .join("diffusion_pytorch_model-00002-of-00003.safetensors");
    std::fs::remove_file(&shard)?;
    let err = FluxTransformer::load("repo", dir.path(), DType::F32, &Device::Cpu)
        .expect_err("a shard is missing");
    let (file, message) = model_load_error(err);
    assert_eq!(file, shard, "{message}");
    Ok(())
}

#[test]
fn a_transformer_of_another_width_names_the_key() -> TestResult {
    // A Fill transformer's weights under a base model's config.json.
    let dir = copy_dir(&model_dir("tiny-flux-fill").join("transformer"))?;
    std::fs::copy(
        model_dir("tiny-flux-dev").join("transformer/config.json"),
        dir.path().join("config.json"),
    )?;
    let err = FluxTransformer::load("repo", dir.path(), DType::F32, &Device::Cpu)
        .expect_err("x_embedder is 144 wide, the config says 64");
    let (file, message) = model_load_error(err);
    assert_eq!(
        file,
        dir.path().join("diffusion_pytorch_model.safetensors"),
        "{message}"
    );
    assert!(message.contains("x_embedder.weight"), "{message}");
    Ok(())
}

#[test]
fn a_missing_weight_names_the_key() -> TestResult {
    let dir = tempfile::tempdir()?;
    let source = model_dir("tiny-flux-schnell").join("transformer");
    std::fs::copy(source.join("config.json"), dir.path().join("config.json"))?;
    let mut tensors = candle_core::safetensors::load(
        source.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )?;
    tensors.remove("single_transformer_blocks.1.attn.norm_k.weight");
    candle_core::safetensors::save(
        &tensors,
        dir.path().join("diffusion_pytorch_model.safetensors"),
    )?;
    let err = FluxTransformer::load("repo", dir.path(), DType::F32, &Device::Cpu)
        .expect_err("a weight is missing");
    let (_, message) = model_load_error(err);
    assert!(
        message.contains("single_transformer_blocks.1.attn.norm_k.weight"),
        "{message}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Text encoders and tokenizer

/// T5 hidden states: 2 blocks at 512 tokens, float32 (observed 4.3e-6); also used for CLIP
/// (observed 3e-7).
const T5_TOLERANCE: f32 = 2e-5;

#[derive(serde::Deserialize)]
struct Tokens {
    t5: Vec<TokenCase>,
    t5_relative_buckets: Vec<BucketCase>,
}

#[derive(serde::Deserialize)]
struct TokenCase {
    model: String,
    text: String,
    max_length: usize,
    input_ids: Vec<u32>,
    untruncated: usize,
}

#[derive(serde::Deserialize)]
struct BucketCase {
    num_buckets: usize,
    max_distance: usize,
    first: i64,
    buckets: Vec<u32>,
}

fn tokens() -> Result<Tokens, Box<dyn std::error::Error>> {
    let path = fixtures().join("references/flux/components/tokens.json");
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

fn ids_tensor(ids: &Tensor) -> Result<Tensor, Box<dyn std::error::Error>> {
    Ok(ids.to_dtype(DType::U32)?)
}

#[test]
fn t5_matches_transformers() -> TestResult {
    let refs = components("t5")?;
    let dir = model_dir("tiny-flux-dev").join("text_encoder_2");
    let t5 = T5Encoder::load("tiny-flux-dev", &dir, DType::F32, &Device::Cpu)?;
    let hidden = t5.forward(&ids_tensor(get(&refs, "input_ids"))?)?;
    assert_close(&hidden, get(&refs, "last_hidden_state"), T5_TOLERANCE, "t5")
}

#[test]
fn t5_refuses_float16() {
    let dir = model_dir("tiny-flux-dev").join("text_encoder_2");
    let err = T5Encoder::load("tiny-flux-dev", &dir, DType::F16, &Device::Cpu)
        .expect_err("float16 is refused");
    assert!(err.to_string().contains("float16"), "{err}");
    assert_eq!(t5::run_dtype(DType::F16), DType::BF16);
}

#[test]
fn t5_relative_buckets_match_transformers() -> TestResult {
    // Both the tiny config and T5-XXL's (32 buckets, distance 128), for distances -600..=600.
    for case in tokens()?.t5_relative_buckets {
        for (i, want) in case.buckets.iter().enumerate() {
            let position = case.first + i as i64;
            let got = t5::relative_bucket(position, case.num_buckets, case.max_distance);
            assert_eq!(
                got, *want,
                "position {position}, {} buckets, distance {}",
                case.num_buckets, case.max_distance
            );
        }
    }
    Ok(())
}

#[test]
fn t5_tokenizer_matches_transformers() -> TestResult {
    // tiny-flux-dev has tokenizer.json, tiny-flux-schnell only spiece.model.
    let tokens = tokens()?;
    let mut checked = HashMap::new();
    for model in ["tiny-flux-dev", "tiny-flux-schnell"] {
        let tokenizer = T5Tokenizer::load(model, &model_dir(model).join("tokenizer_2"))?;
        for case in tokens.t5.iter().filter(|c| c.model == model) {
            let got = tokenizer.encode(&case.text, case.max_length)?;
            assert_eq!(
                got.ids, case.input_ids,
                "{model}: {:?} at {}",
                case.text, case.max_length
            );
            assert_eq!(
                got.untruncated_len, case.untruncated,
                "{model}: {:?}",
                case.text
            );
            assert_eq!(got.truncated(), case.untruncated > case.max_length);
            *checked.entry(model).or_insert(0) += 1;
        }
    }
    // 7 prompts x 3 lengths per model; one prompt is longer than 77 tokens.
    assert_eq!(checked.values().copied().collect::<Vec<_>>(), vec![21, 21]);
    assert!(tokens.t5.iter().any(|c| c.untruncated > c.max_length));
    Ok(())
}

#[test]
fn clip_pooled_output_matches_transformers() -> TestResult {
    // FLUX takes CLIP's pooled output: the final-norm hidden state at the first end-of-text token.
    let refs = components("clip")?;
    let dir = model_dir("tiny-flux-dev").join("text_encoder");
    let config: ClipTextConfig = read_json("tiny-flux-dev", &dir.join("config.json"))?;
    let vb = weights::load_var_builder("tiny-flux-dev", &dir, "model", DType::F32, &Device::Cpu)?;
    let clip = ClipTextTransformer::new(vb, config)?;
    let ids = get(&refs, "input_ids");
    let hidden = clip.forward(&ids_tensor(ids)?)?;
    assert_close(
        &hidden,
        get(&refs, "last_hidden_state"),
        T5_TOLERANCE,
        "clip hidden",
    )?;
    let eos = 1000u32;
    let rows = ids_tensor(ids)?.to_vec2::<u32>()?;
    let pooled = rows
        .iter()
        .enumerate()
        .map(|(b, row)| {
            let at = row
                .iter()
                .position(|&id| id == eos)
                .expect("every row has an eos");
            hidden.get(b)?.get(at)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let pooled = Tensor::stack(&pooled, 0)?;
    assert_close(
        &pooled,
        get(&refs, "pooler_output"),
        T5_TOLERANCE,
        "clip pooled",
    )
}

// ---------------------------------------------------------------------------------------------
// Redux

/// SigLIP and Redux outputs, float32: observed 2.5e-7 to 4.2e-6 (with the prompt's T5 states).
const REDUX_TOLERANCE: f32 = 2e-5;

fn picture(name: &str) -> Result<image::RgbImage, Box<dyn std::error::Error>> {
    let path = fixtures().join(format!("references/flux/inputs/{name}.png"));
    Ok(image::open(path)?.to_rgb8())
}

fn redux() -> Result<FluxRedux, WorkerError> {
    FluxRedux::load(
        "tiny-flux-redux",
        &model_dir("tiny-flux-redux"),
        DType::F32,
        &Device::Cpu,
    )
}

#[test]
fn redux_preprocessing_matches_transformers_exactly() -> TestResult {
    // 48x40 is resized to 32x32 with Pillow's bicubic filter; 32x32 is used as it is.
    let refs = components("redux")?;
    let redux = redux()?;
    for name in ["picture_48x40", "picture_32x32"] {
        let pixels = redux.preprocess(&picture(name)?)?;
        assert_eq!(
            pixels.flatten_all()?.to_vec1::<f32>()?,
            get(&refs, &format!("{name}.pixel_values"))
                .flatten_all()?
                .to_vec1::<f32>()?,
            "{name}"
        );
    }
    Ok(())
}

#[test]
fn siglip_and_redux_embeds_match() -> TestResult {
    let refs = components("redux")?;
    let redux = redux()?;
    assert_eq!(redux.joint_dim(), 32);
    for name in ["picture_48x40", "picture_32x32"] {
        let hidden = redux.encode_pixels(get(&refs, &format!("{name}.pixel_values")))?;
        assert_close(
            &hidden,
            get(&refs, &format!("{name}.last_hidden_state")),
            REDUX_TOLERANCE,
            name,
        )?;
        let embeds = redux.embed(&picture(name)?)?;
        assert_eq!(embeds.dims(), &[1, 16, 32]);
        assert_close(
            &embeds,
            get(&refs, &format!("{name}.image_embeds")),
            REDUX_TOLERANCE,
            name,
        )?;
    }
    Ok(())
}

#[test]
fn redux_conditioning_matches_the_prior_pipeline() -> TestResult {
    let redux = redux()?;
    let image = picture("picture_48x40")?;
    let case = |name: &str| {
        candle_core::safetensors::load(
            fixtures().join(format!("references/flux/tensors/{name}.safetensors")),
            &Device::Cpu,
        )
    };
    // Without a prompt: zeros for the 512 text tokens and the pooled vector.
    let refs = case("flux_redux")?;
    let (embeds, pooled) = redux.conditioning(std::slice::from_ref(&image), None, 32)?;
    assert_close(
        &embeds,
        get(&refs, "redux_prompt_embeds"),
        REDUX_TOLERANCE,
        "redux",
    )?;
    assert_eq!(pooled.to_vec2::<f32>()?, vec![vec![0f32; 32]]);

    // With a prompt, encoded by the base model's T5 (512 tokens) and CLIP.
    let refs = case("flux_redux_prompt")?;
    let dev = model_dir("tiny-flux-dev");
    let tokenizer = T5Tokenizer::load("dev", &dev.join("tokenizer_2"))?;
    let ids = tokenizer.encode("a painting of a red castle", 512)?.ids;
    let t5 = T5Encoder::load("dev", &dev.join("text_encoder_2"), DType::F32, &Device::Cpu)?;
    let text = t5.forward(&Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?)?;
    let clip_tokenizer = ClipTokenizer::load("dev", &dev.join("tokenizer"), 77)?;
    let clip_ids = clip_tokenizer.encode("a painting of a red castle")?;
    let config: ClipTextConfig = read_json("dev", &dev.join("text_encoder/config.json"))?;
    let vb = weights::load_var_builder(
        "dev",
        &dev.join("text_encoder"),
        "model",
        DType::F32,
        &Device::Cpu,
    )?;
    let clip = ClipTextTransformer::new(vb, config)?;
    let hidden = clip.forward(&Tensor::new(clip_ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?)?;
    let eos = clip_ids
        .iter()
        .position(|&id| id == 1000)
        .expect("the prompt ends with eos");
    let clip_pooled = hidden.get(0)?.get(eos)?.unsqueeze(0)?;
    let (embeds, pooled) = redux.conditioning(&[image], Some((&text, &clip_pooled)), 32)?;
    assert_close(
        &embeds,
        get(&refs, "redux_prompt_embeds"),
        REDUX_TOLERANCE,
        "redux with prompt",
    )?;
    assert_close(
        &pooled,
        get(&refs, "redux_pooled_prompt_embeds"),
        REDUX_TOLERANCE,
        "redux pooled",
    )
}

/// A copy of the tiny Redux repo the test may change.
fn redux_copy() -> Result<tempfile::TempDir, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let source = model_dir("tiny-flux-redux");
    std::fs::copy(
        source.join("model_index.json"),
        dir.path().join("model_index.json"),
    )?;
    for part in ["image_encoder", "feature_extractor", "image_embedder"] {
        copy_into(&source.join(part), &dir.path().join(part))?;
    }
    Ok(dir)
}

#[test]
fn siglip_weights_load_with_or_without_the_vision_model_prefix() -> TestResult {
    let dir = redux_copy()?;
    let file = dir.path().join("image_encoder/model.safetensors");
    let tensors = candle_core::safetensors::load(&file, &Device::Cpu)?;
    let prefixed: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (format!("vision_model.{k}"), v))
        .collect();
    candle_core::safetensors::save(&prefixed, &file)?;
    let hub_style = FluxRedux::load("hub", dir.path(), DType::F32, &Device::Cpu)?;
    let image = picture("picture_48x40")?;
    let (a, b) = (hub_style.embed(&image)?, redux()?.embed(&image)?);
    assert_eq!(
        a.flatten_all()?.to_vec1::<f32>()?,
        b.flatten_all()?.to_vec1::<f32>()?
    );
    Ok(())
}

#[test]
fn a_repo_that_is_not_a_redux_prior_is_named() -> TestResult {
    let err = FluxRedux::load("dev", &model_dir("tiny-flux-dev"), DType::F32, &Device::Cpu)
        .expect_err("a FluxPipeline repo is not a Redux prior");
    let (file, message) = model_load_error(err);
    assert_eq!(file, model_dir("tiny-flux-dev").join("model_index.json"));
    assert!(
        message.contains("_class_name") && message.contains("FluxPipeline"),
        "{message}"
    );

    // An embedder whose input width is not the image encoder's.
    let dir = redux_copy()?;
    let config = dir.path().join("image_embedder/config.json");
    std::fs::write(&config, r#"{"redux_dim": 48, "txt_in_features": 32}"#)?;
    let (file, message) = model_load_error(
        FluxRedux::load("copy", dir.path(), DType::F32, &Device::Cpu).expect_err("48 != 24"),
    );
    assert_eq!(file, config);
    assert!(message.contains("redux_dim"), "{message}");

    // Missing SigLIP weights name the file.
    let dir = redux_copy()?;
    std::fs::remove_file(dir.path().join("image_encoder/model.safetensors"))?;
    let (file, _) = model_load_error(
        FluxRedux::load("copy", dir.path(), DType::F32, &Device::Cpu).expect_err("no weights"),
    );
    assert_eq!(file, dir.path().join("image_encoder/model.safetensors"));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// One denoising step of the pipelines, from the tensors diffusers recorded

#[derive(serde::Deserialize)]
struct PipelineCase {
    name: String,
    model: String,
    task: String,
    steps: usize,
    n: usize,
    width: usize,
    height: usize,
    timesteps: Vec<f64>,
}

/// The first step of every recorded pipeline case: scheduler timesteps (with mu from the packed
/// token count), the initial latents (noise draws packed, for text-to-image), the transformer's
/// velocity and the scheduler's step must give diffusers' latents after step 0. Observed 2e-7 to
/// 8.6e-6 (Fill, whose input has 144 channels); the tolerance is 5e-5.
#[test]
fn first_pipeline_steps_match_diffusers() -> TestResult {
    let manifest: Vec<PipelineCase> = serde_json::from_str(&std::fs::read_to_string(
        fixtures().join("references/flux/manifest.json"),
    )?)?;
    let mut transformers: HashMap<String, FluxTransformer> = HashMap::new();
    for case in &manifest {
        let refs = candle_core::safetensors::load(
            fixtures().join(format!("references/flux/tensors/{}.safetensors", case.name)),
            &Device::Cpu,
        )?;
        let dir = model_dir(&case.model);
        if !transformers.contains_key(&case.model) {
            let model = FluxTransformer::load(
                &case.model,
                &dir.join("transformer"),
                DType::F32,
                &Device::Cpu,
            )?;
            transformers.insert(case.model.clone(), model);
        }
        let model = &transformers[&case.model];
        let (h, w) = (2 * (case.height / 4), 2 * (case.width / 4));
        let tokens = (h / 2) * (w / 2);

        let config = SchedulerConfig::from_file(&dir.join("scheduler/scheduler_config.json"))?;
        let kind = SchedulerKind::from_config(&config).expect("a flow-matching config");
        let context = ScheduleContext {
            image_seq_len: Some(tokens),
        };
        let mut scheduler = kind.build_with(&config, case.steps, &context)?;
        let start = scheduler.timesteps().len() - case.timesteps.len();
        let loop_timesteps: Vec<f32> = scheduler.timesteps()[start..]
            .iter()
            .map(|&t| t as f32)
            .collect();
        let want: Vec<f32> = case.timesteps.iter().map(|&t| t as f32).collect();
        assert_eq!(loop_timesteps, want, "{}: timesteps", case.name);

        let fed = get(&refs, "step0.hidden_states");
        let latents = fed.narrow(2, 0, 64)?;
        if case.task == "text2img" || case.task == "redux" {
            let noise =
                TorchRng::new(42).randn_tensor(&[case.n, 16, h, w], &Device::Cpu, DType::F32)?;
            let diff = (pack_latents(&noise)? - &latents)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            // TorchRng matches torch's vectorised float32 Box-Muller to about 1e-6 (rng.rs).
            assert!(
                diff <= 2e-6,
                "{}: initial latents differ by {diff}",
                case.name
            );
        }
        let timestep = get(&refs, "step0.timestep");
        assert_eq!(
            timestep.to_vec1::<f32>()?,
            vec![want[0] / 1000.0; case.n],
            "{}: timestep",
            case.name
        );
        let velocity = model.forward(
            fed,
            get(&refs, "step0.img_ids"),
            get(&refs, "step0.encoder_hidden_states"),
            get(&refs, "step0.txt_ids"),
            timestep,
            refs.get("step0.guidance"),
            get(&refs, "step0.pooled_projections"),
        )?;
        let stepped = scheduler.step(&velocity, start, &latents, &mut TorchRng::new(0))?;
        let after = get(&refs, "step_latents").get(0)?;
        if case.task == "inpaint" {
            // The recorded latents are after the blend with the noised picture; compare the
            // repainted tokens only (mask 1).
            let mask = get(&refs, "mask_latents");
            let masked = |t: &Tensor| t.broadcast_mul(mask);
            assert_close(&masked(&stepped)?, &masked(&after)?, 5e-5, &case.name)?;
        } else {
            assert_close(&stepped, &after, 5e-5, &case.name)?;
        }
    }
    assert_eq!(manifest.len(), 9);
    Ok(())
}
