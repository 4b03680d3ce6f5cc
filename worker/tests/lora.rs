//! LoRA adapters against diffusers: the tiny adapters of `tests/fixtures/loras/` (PEFT, kohya and
//! xlabs formats, from `make_lora_fixtures.py`) on tiny-sd15, tiny-sdxl and tiny-flux-dev must give
//! the images diffusers makes with `load_lora_weights` + `set_adapters(names, weights)`, within
//! 2/255; nothing may leak into a later request without adapters; bad files stop the load naming
//! the adapter and the reason.

mod references;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use fastfusion_worker::lora::{AdapterFile, LoraWeight};
use fastfusion_worker::pipelines::{
    BatchEntry, Input, LoadOptions, NoProgress, Pipeline, TextToImage,
};
use fastfusion_worker::schedulers::SchedulerKind;
use references::{fixtures, max_diff, BoxResult, TestResult, TOLERANCE};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
struct Setting {
    name: String,
    weight: f32,
}

#[derive(Debug, Clone, Deserialize)]
struct Case {
    name: String,
    model: String,
    prompt: String,
    seed: u64,
    steps: usize,
    guidance_scale: f64,
    width: usize,
    height: usize,
    n: usize,
    images: Vec<String>,
    loras: Vec<Setting>,
    max_sequence_length: Option<usize>,
}

fn cases() -> BoxResult<Vec<Case>> {
    let text = std::fs::read_to_string(fixtures().join("references/lora/manifest.json"))?;
    Ok(serde_json::from_str(&text)?)
}

fn case(name: &str) -> BoxResult<Case> {
    cases()?
        .into_iter()
        .find(|c| c.name == name)
        .ok_or_else(|| format!("no case {name}").into())
}

/// Every adapter file the fixture script wrote, by name.
fn adapter_files() -> BoxResult<HashMap<String, PathBuf>> {
    let text = std::fs::read_to_string(fixtures().join("loras/adapters.json"))?;
    let files: HashMap<String, String> = serde_json::from_str(&text)?;
    Ok(files
        .into_iter()
        .map(|(name, file)| (name, fixtures().join(file)))
        .collect())
}

/// `model` with the adapters `names` loaded.
fn load(model: &str, names: &[&str], offload: bool) -> BoxResult<Pipeline> {
    let files = adapter_files()?;
    let loras = names
        .iter()
        .map(|n| {
            let path = files.get(*n).ok_or(format!("no adapter {n}"))?;
            Ok(AdapterFile::new(*n, path))
        })
        .collect::<BoxResult<Vec<_>>>()?;
    let opts = LoadOptions {
        cpu_offload: offload,
        loras,
        ..LoadOptions::new(model, Device::Cpu, DType::F32)
    };
    Ok(Pipeline::load(
        &fixtures().join("models").join(model),
        &opts,
    )?)
}

fn load_error(model: &str, loras: Vec<AdapterFile>) -> String {
    let opts = LoadOptions {
        loras,
        ..LoadOptions::new(model, Device::Cpu, DType::F32)
    };
    match Pipeline::load(&fixtures().join("models").join(model), &opts) {
        Ok(_) => panic!("{model} loaded with a bad adapter"),
        Err(e) => e.to_string(),
    }
}

impl Case {
    /// The request, with `rename` applied to adapter names (to run a case on a kohya copy).
    fn request(&self, rename: &dyn Fn(&str) -> String) -> TextToImage {
        let flux = self.model.contains("flux");
        TextToImage {
            prompt: self.prompt.clone(),
            negative_prompt: None,
            n: self.n,
            width: self.width,
            height: self.height,
            seed: self.seed,
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            scheduler: if flux {
                SchedulerKind::FlowMatchEuler
            } else {
                SchedulerKind::Euler
            },
            max_sequence_length: self.max_sequence_length,
            loras: self
                .loras
                .iter()
                .map(|s| LoraWeight {
                    name: rename(&s.name),
                    weight: s.weight,
                })
                .collect(),
        }
    }

    fn reference(&self) -> BoxResult<image::RgbImage> {
        let file = fixtures().join("references/lora").join(&self.images[0]);
        Ok(image::open(file)?.to_rgb8())
    }

    /// Runs on `model` (with `rename` for adapter names) and returns the largest difference
    /// from this case's reference image.
    fn diff_on(&self, model: &Pipeline, rename: &dyn Fn(&str) -> String) -> BoxResult<u8> {
        let images = model.text_to_image(&self.request(rename), &mut NoProgress)?;
        if let Some(dir) = std::env::var_os("LORA_TEST_DUMP") {
            images[0].save(Path::new(&dir).join(&self.images[0]))?;
        }
        Ok(max_diff(&images[0], &self.reference()?))
    }
}

fn same(name: &str) -> String {
    name.to_string()
}

/// Runs every case of `model` on one pipeline holding all of its adapters, LoRA cases first,
/// the plain one last (which must not see anything of the ones before).
fn check_model(model: &str, adapters: &[&str]) -> TestResult {
    let pipeline = load(model, adapters, false)?;
    let mut cases: Vec<Case> = cases()?.into_iter().filter(|c| c.model == model).collect();
    cases.sort_by_key(|c| c.loras.is_empty());
    let mut failures = Vec::new();
    for c in &cases {
        let diff = c.diff_on(&pipeline, &same)?;
        eprintln!("{}: max diff {diff}/255", c.name);
        if diff > TOLERANCE {
            failures.push(format!("{}: {diff}/255", c.name));
        }
    }
    assert!(
        failures.is_empty(),
        "off by more than {TOLERANCE}/255: {failures:?}"
    );
    Ok(())
}

#[test]
fn sd15_adapters_match_diffusers() -> TestResult {
    check_model("tiny-sd15", &["sd15_style", "sd15_detail", "sd15_te"])
}

#[test]
fn sdxl_adapters_with_both_text_encoders_match_diffusers() -> TestResult {
    check_model("tiny-sdxl", &["sdxl_style", "sdxl_te2"])
}

#[test]
fn flux_adapters_match_diffusers() -> TestResult {
    check_model("tiny-flux-dev", &["flux_style", "flux_xlabs"])
}

#[test]
fn kohya_copies_give_the_peft_images() -> TestResult {
    let kohya = |name: &str| format!("{name}_kohya");
    let sd15 = load(
        "tiny-sd15",
        &["sd15_style_kohya", "sd15_detail_kohya"],
        false,
    )?;
    for name in ["sd15_style", "sd15_two"] {
        let diff = case(name)?.diff_on(&sd15, &kohya)?;
        assert!(diff <= TOLERANCE, "{name} from kohya files: {diff}/255");
    }
    drop(sd15);
    let sdxl = load("tiny-sdxl", &["sdxl_style_kohya"], false)?;
    let diff = case("sdxl_style")?.diff_on(&sdxl, &kohya)?;
    assert!(diff <= TOLERANCE, "SDXL from SGM-named kohya: {diff}/255");
    drop(sdxl);
    // diffusers cannot load this one on a tiny model (its converter hard-codes FLUX.1's widths);
    // the fused q/k/v and linear1 rows must still give the PEFT adapter's picture.
    let flux = load("tiny-flux-dev", &["flux_style_kohya"], false)?;
    let diff = case("flux_style")?.diff_on(&flux, &kohya)?;
    assert!(diff <= TOLERANCE, "FLUX from BFL-named kohya: {diff}/255");
    Ok(())
}

#[test]
fn a_request_without_loras_after_one_with_gives_the_plain_image() -> TestResult {
    let with = load("tiny-sd15", &["sd15_style"], false)?;
    let style = case("sd15_style")?;
    let plain = case("sd15_plain")?;
    let lora_image = with.text_to_image(&style.request(&same), &mut NoProgress)?;
    let after = with.text_to_image(&plain.request(&same), &mut NoProgress)?;
    let bare = load("tiny-sd15", &[], false)?;
    let without = bare.text_to_image(&plain.request(&same), &mut NoProgress)?;
    assert!(
        max_diff(&lora_image[0], &after[0]) > 20,
        "the adapter changed nothing"
    );
    assert_eq!(after, without, "the plain request saw the adapter");
    assert!(max_diff(&after[0], &plain.reference()?) <= TOLERANCE);
    Ok(())
}

#[test]
fn offloaded_parts_get_their_adapters_back_on_every_build() -> TestResult {
    let offloaded = load("tiny-sd15", &["sd15_style", "sd15_detail"], true)?;
    for name in ["sd15_two", "sd15_plain", "sd15_two"] {
        let diff = case(name)?.diff_on(&offloaded, &same)?;
        assert!(diff <= TOLERANCE, "{name} offloaded: {diff}/255");
    }
    Ok(())
}

#[test]
fn requests_with_the_same_set_batch_to_their_solo_images() -> TestResult {
    let model = load("tiny-sd15", &["sd15_style", "sd15_detail"], false)?;
    let c = case("sd15_two")?;
    let a = c.request(&same);
    let b = TextToImage {
        seed: 7,
        ..c.request(&same)
    };
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
    let results = model.generate_batch(&mut entries);
    let batched: Vec<_> = results.into_iter().collect::<Result<_, _>>()?;
    let alone_b = model.text_to_image(&b, &mut NoProgress)?;
    assert!(max_diff(&batched[0][0], &c.reference()?) <= TOLERANCE);
    assert!(max_diff(&batched[1][0], &alone_b[0]) <= 1);
    Ok(())
}

#[test]
fn an_unknown_adapter_in_a_request_names_lora_settings() -> TestResult {
    let model = load("tiny-sd15", &["sd15_te"], false)?;
    let mut req = case("sd15_te")?.request(&same);
    req.loras[0].name = "nope".into();
    let err = model
        .text_to_image(&req, &mut NoProgress)
        .expect_err("unknown adapter")
        .to_string();
    assert!(
        err.contains("lora_settings") && err.contains("sd15_te"),
        "{err}"
    );
    Ok(())
}

/// A temporary adapter file holding `tensors`.
fn temp_adapter(dir: &Path, name: &str, tensors: &[(&str, &[usize])]) -> BoxResult<AdapterFile> {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, dims)| {
            Ok((
                k.to_string(),
                Tensor::ones(*dims, DType::F32, &Device::Cpu)?,
            ))
        })
        .collect::<BoxResult<_>>()?;
    let path = dir.join(format!("{name}.safetensors"));
    candle_core::safetensors::save(&map, &path)?;
    Ok(AdapterFile::new(name, path))
}

#[test]
fn adapters_that_do_not_fit_stop_the_load_naming_why() -> TestResult {
    let dir = tempfile::tempdir()?;
    let files = adapter_files()?;

    // An SDXL adapter on SD 1.5: text_encoder_2 weights and UNet keys it does not have.
    let err = load_error(
        "tiny-sd15",
        vec![AdapterFile::new("xl", &files["sdxl_style"])],
    );
    assert!(err.contains("adapter 'xl'"), "{err}");
    assert!(
        err.contains("match no module") || err.contains("does not"),
        "{err}"
    );

    let unmatched = temp_adapter(
        dir.path(),
        "ghost",
        &[
            (
                "unet.down_blocks.9.attentions.0.proj_in.lora_A.weight",
                &[2, 32],
            ),
            (
                "unet.down_blocks.9.attentions.0.proj_in.lora_B.weight",
                &[32, 2],
            ),
        ],
    )?;
    let err = load_error("tiny-sd15", vec![unmatched]);
    assert!(
        err.contains("ghost") && err.contains("match no module") && err.contains("down_blocks.9"),
        "{err}"
    );

    let dora = temp_adapter(
        dir.path(),
        "dora",
        &[
            ("lora_unet_conv_in.lora_down.weight", &[2, 4, 3, 3]),
            ("lora_unet_conv_in.lora_up.weight", &[32, 2, 1, 1]),
            ("lora_unet_conv_in.dora_scale", &[32, 1, 1, 1]),
        ],
    )?;
    let err = load_error("tiny-sd15", vec![dora]);
    assert!(err.contains("'dora'") && err.contains("DoRA"), "{err}");

    // A diffusers-format control LoRA widens x_embedder's input to twice the latent channels.
    let control = temp_adapter(
        dir.path(),
        "canny",
        &[
            ("transformer.x_embedder.lora_A.weight", &[2, 128]),
            ("transformer.x_embedder.lora_B.weight", &[32, 2]),
        ],
    )?;
    let err = load_error("tiny-flux-dev", vec![control]);
    assert!(err.contains("canny") && err.contains("control"), "{err}");

    let bfl_control = temp_adapter(
        dir.path(),
        "depth",
        &[("double_blocks.0.img_attn.norm.query_norm.scale", &[16])],
    )?;
    let err = load_error("tiny-flux-dev", vec![bfl_control]);
    assert!(
        err.contains("depth") && err.contains("control image"),
        "{err}"
    );

    let html = dir.path().join("page.safetensors");
    std::fs::write(&html, b"<!doctype html><html>login</html>")?;
    let err = load_error("tiny-sd15", vec![AdapterFile::new("page", &html)]);
    assert!(
        err.contains("page") && err.contains("not a safetensors"),
        "{err}"
    );

    let whole = std::fs::read(&files["sd15_te"])?;
    let truncated = dir.path().join("cut.safetensors");
    std::fs::write(&truncated, &whole[..whole.len() / 2])?;
    let err = load_error("tiny-sd15", vec![AdapterFile::new("cut", &truncated)]);
    assert!(err.contains("cut") && err.contains("safetensors"), "{err}");

    let twice = vec![
        AdapterFile::new("same", &files["sd15_te"]),
        AdapterFile::new("same", &files["sd15_te"]),
    ];
    assert!(load_error("tiny-sd15", twice).contains("duplicate"));
    Ok(())
}
