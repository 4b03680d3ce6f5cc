//! End to end: a FLUX model behind the real gateway (embedded worker), configured as the seed's
//! FLUX example is — generations with FluxPipeline, masked edits with FluxFillPipeline (a Fill
//! transformer beside the base, `edits_config.inpaint_pipeline`), unmasked edits as
//! FluxImg2ImgPipeline, variations through the Redux prior — on the tiny FLUX fixtures. Every
//! endpoint's picture must be diffusers' reference image (`references/flux/`) within 2/255, and
//! FLUX's own limits (flow-matching schedulers only, `max_sequence_length`) are enforced with
//! errors naming the parameter.

use anyhow::{ensure, Result};
use fastfusion_tests::{fixture, FormPart, Gateway};
use serde_json::{json, Value};

const PROMPT: &str = "a photo of an astronaut riding a horse on the moon";

fn model(name: &str) -> String {
    fixture(&format!("models/{name}")).display().to_string()
}

fn flux_config() -> Value {
    json!({
        "name": "flux-dev",
        "pipeline": {
            "hf_model_id": model("tiny-flux-dev"),
            "max_n": 2,
            "torch_dtype_init": "float32",
            "torch_dtype_run": "float32",
            "torch_device": "cpu",
            "enable_cpu_offload": false,
            "enable_vae_slicing": false,
            "enable_vae_tiling": false,
            "global_guidance_scale": 3.5,
            "global_num_inference_steps": 3,
            "max_pixels": 64 * 64,
            "generations_config": {"enabled": true, "pipeline": "FluxPipeline"},
            "edits_config": {
                "enabled": true,
                "pipeline": "FluxFillPipeline",
                "inpaint_pipeline": model("tiny-flux-fill")
            },
            "variations_config": {
                "enabled": true,
                "pipeline": "AutoPipelineForImage2Image",
                "enable_flux_redux": true,
                "flux_redux_model_id": model("tiny-flux-redux"),
                "vision_model": ""
            }
        },
        "generation_presets": {"standard": {"guidance_scale": 3.5, "num_inference_steps": 3}}
    })
}

fn reference(file: &str) -> Result<image::RgbImage> {
    Ok(image::open(fixture(&format!("references/flux/{file}")))?.to_rgb8())
}

fn input(file: &str) -> Result<Vec<u8>> {
    Ok(std::fs::read(fixture(&format!(
        "references/flux/inputs/{file}"
    )))?)
}

fn max_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(u8::MAX)
}

fn assert_matches(got: &image::RgbImage, file: &str) -> Result<()> {
    let want = reference(file)?;
    ensure!(got.dimensions() == want.dimensions(), "{file}: size");
    let diff = max_diff(got, &want);
    ensure!(diff <= 2, "{file}: max diff {diff}/255");
    Ok(())
}

#[test]
fn every_endpoint_of_a_flux_model_gives_diffusers_pictures() -> Result<()> {
    let mut gw = Gateway::start_with(&flux_config())?;

    // Generations: FluxPipeline.
    let (status, body) = gw.post_json(
        "/v1/images/generations",
        &json!({"prompt": PROMPT, "size": "32x32", "seed": 42, "num_inference_steps": 3,
                "guidance_scale": 3.5, "response_format": "b64_json"}),
    )?;
    let image = gw.first_image(status, &body)?;
    assert_matches(&image, "flux_dev_t2i_0.png")?;

    // Masked edit: the Fill transformer beside the base (FluxFillPipeline).
    let (picture, mask) = (input("picture_32x32.png")?, input("mask_32x32.png")?);
    let (status, body) = gw.post_form(
        "/v1/images/edits",
        &[
            FormPart::Text("prompt", PROMPT),
            FormPart::File("image", &picture),
            FormPart::File("mask", &mask),
            FormPart::Text("size", "32x32"),
            FormPart::Text("seed", "42"),
            FormPart::Text("num_inference_steps", "4"),
            FormPart::Text("guidance_scale", "30"),
            FormPart::Text("strength", "1.0"),
            FormPart::Text("response_format", "b64_json"),
        ],
    )?;
    let image = gw.first_image(status, &body)?;
    assert_matches(&image, "flux_fill_0.png")?;

    // Unmasked edit: FluxImg2ImgPipeline (FLUX's strength rule: 3 of 4 steps at 0.6).
    let (status, body) = gw.post_form(
        "/v1/images/edits",
        &[
            FormPart::Text("prompt", PROMPT),
            FormPart::File("image", &picture),
            FormPart::Text("size", "32x32"),
            FormPart::Text("seed", "42"),
            FormPart::Text("num_inference_steps", "4"),
            FormPart::Text("guidance_scale", "3.5"),
            FormPart::Text("strength", "0.6"),
            FormPart::Text("response_format", "b64_json"),
        ],
    )?;
    let image = gw.first_image(status, &body)?;
    assert_matches(&image, "flux_dev_img2img_0.png")?;

    // Variations through the Redux prior, without and with a prompt.
    let redux_input = input("picture_48x40.png")?;
    for (prompt, file) in [
        (None, "flux_redux_0.png"),
        (
            Some("a painting of a red castle"),
            "flux_redux_prompt_0.png",
        ),
    ] {
        let mut parts = vec![
            FormPart::File("image", &redux_input),
            FormPart::Text("size", "32x32"),
            FormPart::Text("seed", "42"),
            FormPart::Text("num_inference_steps", "3"),
            FormPart::Text("guidance_scale", "2.5"),
            FormPart::Text("response_format", "b64_json"),
        ];
        if let Some(prompt) = prompt {
            parts.push(FormPart::Text("prompt", prompt));
        }
        let (status, body) = gw.post_form("/v1/images/variations", &parts)?;
        let image = gw.first_image(status, &body)?;
        assert_matches(&image, file)?;
    }
    Ok(())
}

#[test]
fn a_flux_model_lists_and_enforces_its_own_limits() -> Result<()> {
    let gw = Gateway::start_with(&flux_config())?;
    let models: Value = gw
        .client
        .get(format!("{}/v1/models", gw.base))
        .send()?
        .json()?;
    let entry = &models["data"][0];
    assert_eq!(entry["schedulers"], json!(["flow_match_euler"]), "{entry}");
    assert_eq!(entry["max_sequence_length"], 512, "{entry}");
    assert_eq!(entry["size_multiple"], 8, "{entry}");

    let refused = |body: Value, param: &str| -> Result<()> {
        let (status, answer) = gw.post_json("/v1/images/generations", &body)?;
        ensure!(status == 400, "{body}: status {status}: {answer}");
        ensure!(
            answer["error"]["param"] == param,
            "{body}: expected param {param}: {answer}"
        );
        Ok(())
    };
    // A discrete-time scheduler cannot step a flow-matching model.
    refused(
        json!({"prompt": "x", "size": "32x32", "scheduler": "euler"}),
        "scheduler",
    )?;
    // More T5 tokens than FluxPipeline takes.
    refused(
        json!({"prompt": "x", "size": "32x32", "max_sequence_length": 600}),
        "max_sequence_length",
    )?;
    // A shorter window is honoured.
    let (status, answer) = gw.post_json(
        "/v1/images/generations",
        &json!({"prompt": "x", "size": "32x32", "max_sequence_length": 64,
                "response_format": "b64_json"}),
    )?;
    assert_eq!(status, 200, "{answer}");
    Ok(())
}
