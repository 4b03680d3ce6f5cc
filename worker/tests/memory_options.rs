//! The memory options of `model_config.json` on the tiny fixture model: `enable_cpu_offload`
//! changes where the components live, never the images; `torch_dtype_init` / `torch_dtype_run`
//! load in one precision and run in another.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use fastfusion_worker::error::WorkerError;
use fastfusion_worker::pipelines::{LoadOptions, NoProgress, Pipeline, TextToImage};
use fastfusion_worker::schedulers::SchedulerKind;
use fastfusion_worker::startup;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/tiny-sd15")
}

fn load(init: DType, run: DType, cpu_offload: bool) -> Result<Pipeline, WorkerError> {
    let opts = LoadOptions {
        device: Device::Cpu,
        dtype: run,
        init_dtype: init,
        cpu_offload,
        source_name: "tiny-sd15".to_owned(),
        vae_tiling: false,
        fill_transformer: None,
        redux: None,
        loras: Vec::new(),
    };
    Pipeline::load(&model_dir(), &opts)
}

fn request() -> TextToImage {
    TextToImage {
        prompt: "a red bicycle leaning on a wall".into(),
        negative_prompt: Some("blurry".into()),
        n: 2,
        width: 32,
        height: 32,
        seed: 42,
        steps: 2,
        guidance_scale: 6.0,
        // Ancestral: the per-step noise draws are part of what must not change.
        scheduler: SchedulerKind::EulerAncestral,
        max_sequence_length: None,
        loras: Vec::new(),
    }
}

/// Largest per-channel difference between two images of the same size.
fn max_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

#[test]
fn cpu_offload_gives_the_same_pixels() -> TestResult {
    let resident = load(DType::F32, DType::F32, false)?;
    let offloaded = load(DType::F32, DType::F32, true)?;
    let req = request();
    let want = resident.text_to_image(&req, &mut NoProgress)?;
    // Twice: the second request rebuilds every component from the files again.
    for _ in 0..2 {
        let got = offloaded.text_to_image(&req, &mut NoProgress)?;
        assert_eq!(got.len(), 2);
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.as_raw(), w.as_raw());
        }
    }
    // Image-to-image also runs the VAE encoder.
    let input = &want[0];
    let want = resident.image_to_image(&req, input, 0.7, &mut NoProgress)?;
    let got = offloaded.image_to_image(&req, input, 0.7, &mut NoProgress)?;
    assert_eq!(got[0].as_raw(), want[0].as_raw());
    assert_eq!(got[1].as_raw(), want[1].as_raw());
    Ok(())
}

#[test]
fn init_and_run_dtypes_stay_close_to_float32() -> TestResult {
    let req = request();
    let full = load(DType::F32, DType::F32, false)?.text_to_image(&req, &mut NoProgress)?;
    // Loaded in float32, run in float16 (also with offload, which must not change it).
    let run_half = load(DType::F32, DType::F16, false)?.text_to_image(&req, &mut NoProgress)?;
    let run_half_offloaded =
        load(DType::F32, DType::F16, true)?.text_to_image(&req, &mut NoProgress)?;
    // Loaded in float16 (weights rounded), run in float32.
    let init_half = load(DType::F16, DType::F32, false)?.text_to_image(&req, &mut NoProgress)?;
    for i in 0..req.n {
        let diff = max_diff(&full[i], &run_half[i]);
        assert!(diff <= 8, "run float16 differs by {diff}/255");
        assert_eq!(run_half[i].as_raw(), run_half_offloaded[i].as_raw());
        let diff = max_diff(&full[i], &init_half[i]);
        assert!(diff <= 4, "init float16 differs by {diff}/255");
    }
    // The conversions really happen: a float16 run is not the float32 image.
    assert!(max_diff(&full[0], &run_half[0]) > 0);
    Ok(())
}

#[test]
fn a_bad_dtype_in_the_config_names_its_key() -> TestResult {
    let dir = tempfile::tempdir()?;
    for key in ["torch_dtype_init", "torch_dtype_run"] {
        let path = dir.path().join("model_config.json");
        let config = serde_json::json!({
            "name": "tiny",
            "pipeline": {
                "hf_model_id": model_dir(),
                "max_n": 1,
                "global_guidance_scale": 7.5,
                "global_num_inference_steps": 2,
                "torch_device": "cpu",
                key: "float64",
            }
        });
        std::fs::write(&path, config.to_string())?;
        match startup::read_config(&path) {
            Err(WorkerError::Config { key: got, message }) => {
                assert_eq!(got, format!("pipeline.{key}"));
                assert!(message.contains("float64"), "{message}");
            }
            other => panic!("expected a config error for {key}, got {other:?}"),
        }
    }
    Ok(())
}

#[test]
fn the_config_reaches_the_load_options() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("model_config.json");
    let config = serde_json::json!({
        "name": "tiny",
        "pipeline": {
            "hf_model_id": model_dir(),
            "max_n": 1,
            "global_guidance_scale": 7.5,
            "global_num_inference_steps": 2,
            "torch_device": "cpu",
            // bfloat16 can be stored on the CPU but not run there.
            "torch_dtype_init": "bfloat16",
            "enable_cpu_offload": true,
        }
    });
    std::fs::write(&path, config.to_string())?;
    let config = startup::read_config(&path)?;
    let (_, options) = startup::resolve(&config, Some(dir.path()))?;
    assert_eq!(options.init_dtype, DType::BF16);
    assert_eq!(options.dtype, DType::F32);
    assert!(options.cpu_offload);
    Ok(())
}
