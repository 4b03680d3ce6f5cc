//! Raw OpenAI requests + the target model's `InfoResponse` → [`ValidGeneration`], or a 400 naming
//! the parameter at fault. The three image endpoints share one set of fields
//! ([`CommonFields`], flattened into each request type) and one set of checks on them
//! (`validate_common`); each adds only what is its own.
//!
//! Only a `ValidGeneration` travels on to the worker; it carries every setting resolved (size,
//! steps, guidance, strength), so the worker never has to guess what the client meant. The rules:
//!
//! - The endpoint must be enabled on the model (`InfoResponse.endpoints`); otherwise a 404.
//! - `size`: `"WIDTHxHEIGHT"`, both positive multiples of `max(8, limits.size_multiple)`, at most
//!   `limits.max_pixels` pixels. `"auto"` or absent: for generations the model's native size (OpenAI's
//!   and the seed's default, 1024x1024, is FLUX's and SDXL's native size; SD 1.5's is 512x512, and
//!   each model does best at its own); for edits and variations the first input's size, rounded
//!   to the size multiple and scaled down, keeping its aspect, to fit `max_pixels`.
//! - `quality` picks a preset from `generation_presets` by name. OpenAI's own values (standard, hd,
//!   low, medium, high, auto) fall back to the global defaults when no preset has that name; any
//!   other value is an error. `guidance_scale` and `num_inference_steps` then override on their own.
//! - `scheduler` must be one the worker lists; `lora_settings` names must be loaded LoRAs.
//! - Edits: a prompt and at least one image; with a mask the task is inpainting, without one
//!   image-to-image over the whole picture. Variations: exactly one image, no mask, the prompt
//!   optional (empty: the worker asks its vision model or uses its default). Both: `strength` in
//!   (0, 1], absent = the model's default. The images themselves were checked by
//!   [`crate::uploads::inspect`] before they get here.
//! - `stream: true` answers with server-sent events carrying the images inline, so
//!   `response_format: url` beside it is a 400. `partial_images` (0..=3, as OpenAI allows) is
//!   accepted either way but asked of the worker only when streaming: only a stream shows previews.

use fastfusion_proto::{Endpoint, InfoResponse, Limits, Task};

use crate::error::ApiError;
use crate::openai::{
    Background, CommonFields, ImageEditRequest, ImageGenerationRequest, LoraSetting, OutputFormat,
    ResponseFormat,
};
use crate::uploads::InputImage;

/// OpenAI's `quality` values; they select the global defaults unless a preset has that name.
const OPENAI_QUALITIES: &[&str] = &[
    "standard", "hd", "low", "medium", "high", "xhigh", "max", "auto",
];
/// OpenAI's `style` values (accepted, not used by diffusion models).
const OPENAI_STYLES: &[&str] = &["vivid", "natural"];
/// Size multiple enforced even if a worker reports a smaller one: SD's VAE downsamples by 8.
const MIN_SIZE_MULTIPLE: u32 = 8;
/// Limits used where a worker reports 0 ("not set"), so a misconfigured worker cannot be asked
/// for an image that exhausts its memory.
const FALLBACK_MAX_PIXELS: u64 = 2048 * 2048;
const FALLBACK_MAX_STEPS: u32 = 500;
/// Most preview images OpenAI allows per request.
const MAX_PARTIAL_IMAGES: u32 = 3;

/// A request with every setting checked and resolved, ready for the worker.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidGeneration {
    /// The endpoint it came through; the worker refuses a disabled one.
    pub endpoint: Endpoint,
    pub task: Task,
    /// Empty only for a variation without a prompt.
    pub prompt: String,
    /// Absent = the model's unconditional default (see the proto field).
    pub negative_prompt: Option<String>,
    pub n: u32,
    pub width: u32,
    pub height: u32,
    /// `None` = the worker picks a random seed and reports it.
    pub seed: Option<u64>,
    /// `None` only when the worker reports no defaults; it then uses its own.
    pub num_inference_steps: Option<u32>,
    pub guidance_scale: Option<f32>,
    /// Empty = the model's default scheduler.
    pub scheduler: String,
    pub loras: Vec<(String, f32)>,
    /// FLUX only (checked against the worker's limit); `None` for models without T5.
    pub max_sequence_length: Option<u32>,
    pub response_format: ResponseFormat,
    pub output_format: OutputFormat,
    pub output_compression: Option<u32>,
    /// Echoed in the response: the quality asked for, or `"auto"`.
    pub quality: String,
    /// Echoed in streamed events: the background asked for, or `auto`.
    pub background: Background,
    /// Answer with server-sent events (`response_format` is then always `b64_json`).
    pub stream: bool,
    /// Previews the worker sends per image; 0 unless streaming, since only a stream shows them.
    pub partial_images: u32,
    /// Streaming only: relay queue position and denoising steps as `fastfusion.progress` events.
    pub stream_progress: bool,
    /// Image-to-image and inpaint only; `None` = the worker's default.
    pub strength: Option<f32>,
    /// Input images as uploaded, the edited one first; empty for text-to-image.
    pub images: Vec<bytes::Bytes>,
    /// The inpainting mask as uploaded.
    pub mask: Option<bytes::Bytes>,
}

impl ValidGeneration {
    /// The gRPC request for the worker; `request_id` correlates gateway and worker logs.
    pub fn to_proto(&self, request_id: &str) -> fastfusion_proto::GenerateRequest {
        fastfusion_proto::GenerateRequest {
            request_id: request_id.to_string(),
            task: self.task as i32,
            endpoint: self.endpoint as i32,
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            n: self.n,
            width: self.width,
            height: self.height,
            seed: self.seed,
            num_inference_steps: self.num_inference_steps,
            guidance_scale: self.guidance_scale,
            scheduler: self.scheduler.clone(),
            strength: self.strength,
            loras: self
                .loras
                .iter()
                .map(|(name, weight)| fastfusion_proto::LoraSetting {
                    name: name.clone(),
                    weight: *weight,
                })
                .collect(),
            images: self.images.iter().map(|image| image.to_vec()).collect(),
            mask: self.mask.as_ref().map(|mask| mask.to_vec()),
            max_sequence_length: self.max_sequence_length,
            // AUTO: an alpha channel marks transparent pixels for repainting (OpenAI's masks),
            // otherwise white pixels do (diffusers' and the seed's).
            mask_mode: fastfusion_proto::MaskMode::Auto as i32,
            output_format: self.output_format.to_proto() as i32,
            output_compression: self.output_compression,
            partial_images: self.partial_images,
        }
    }

    /// `"WIDTHxHEIGHT"`, as the response reports it.
    pub fn size(&self) -> String {
        format!("{}x{}", self.width, self.height)
    }
}

/// What a request is for: filled in by each endpoint's validator.
struct Purpose {
    endpoint: Endpoint,
    task: Task,
    prompt: String,
}

/// Checks a text-to-image request against what the model serving it can do.
pub fn validate_generation(
    request: ImageGenerationRequest,
    info: &InfoResponse,
) -> Result<ValidGeneration, ApiError> {
    check_endpoint(info, Endpoint::Generations)?;
    if let Some(style) = &request.style {
        if !OPENAI_STYLES.contains(&style.as_str()) {
            return Err(ApiError::invalid(
                "style",
                format!("style must be vivid or natural, got '{style}'"),
            ));
        }
    }
    let purpose = Purpose {
        endpoint: Endpoint::Generations,
        task: Task::TextToImage,
        prompt: required_prompt(request.common.prompt.clone())?,
    };
    let native = (info.native_width, info.native_height);
    validate_common(purpose, request.common, info, native)
}

/// Checks an edit: `images` and `mask` already passed [`crate::uploads::inspect`].
pub fn validate_edit(
    request: ImageEditRequest,
    images: Vec<InputImage>,
    mask: Option<InputImage>,
    info: &InfoResponse,
) -> Result<ValidGeneration, ApiError> {
    check_endpoint(info, Endpoint::Edits)?;
    let purpose = Purpose {
        endpoint: Endpoint::Edits,
        task: if mask.is_some() {
            Task::Inpaint
        } else {
            Task::ImageToImage
        },
        prompt: required_prompt(request.common.prompt.clone())?,
    };
    validate_image_input(purpose, request, images, mask, info)
}

/// Checks a variation: one image, no mask, an optional prompt.
pub fn validate_variation(
    request: ImageEditRequest,
    images: Vec<InputImage>,
    mask: Option<InputImage>,
    info: &InfoResponse,
) -> Result<ValidGeneration, ApiError> {
    check_endpoint(info, Endpoint::Variations)?;
    if images.len() > 1 {
        return Err(ApiError::invalid(
            "image",
            format!(
                "variations take exactly one image, got {}; use /v1/images/edits for several",
                images.len()
            ),
        ));
    }
    if mask.is_some() {
        return Err(ApiError::invalid(
            "mask",
            "variations take no mask; use /v1/images/edits to repaint part of an image",
        ));
    }
    let purpose = Purpose {
        endpoint: Endpoint::Variations,
        task: Task::ImageToImage,
        // Blank counts as absent: the worker then finds a prompt for the image itself.
        prompt: request
            .common
            .prompt
            .clone()
            .filter(|prompt| !prompt.trim().is_empty())
            .unwrap_or_default(),
    };
    validate_image_input(purpose, request, images, mask, info)
}

/// What edits and variations share: an input image, strength, size `auto` from the input.
fn validate_image_input(
    purpose: Purpose,
    request: ImageEditRequest,
    images: Vec<InputImage>,
    mask: Option<InputImage>,
    info: &InfoResponse,
) -> Result<ValidGeneration, ApiError> {
    let Some(first) = images.first() else {
        return Err(ApiError::invalid(
            "image",
            "image is required: upload it as a multipart file part named image",
        ));
    };
    let limits = info.limits.unwrap_or_default();
    let auto = fit_size(first.width, first.height, &limits);
    let strength = resolve_strength(request.strength, info)?;
    let valid = validate_common(purpose, request.common, info, auto)?;
    Ok(ValidGeneration {
        strength,
        images: images.into_iter().map(|image| image.bytes).collect(),
        mask: mask.map(|mask| mask.bytes),
        ..valid
    })
}

/// The endpoint switch: a disabled endpoint is a 404 (OpenAI's answer for an unknown route).
pub fn check_endpoint(info: &InfoResponse, endpoint: Endpoint) -> Result<(), ApiError> {
    if info.endpoints.contains(&(endpoint as i32)) {
        Ok(())
    } else {
        Err(endpoint_disabled(&[info.model_id.as_str()], endpoint))
    }
}

/// The 404 for `endpoint` switched off on every model in `models`.
pub fn endpoint_disabled(models: &[&str], endpoint: Endpoint) -> ApiError {
    let (path, key) = match endpoint {
        Endpoint::Generations => ("/v1/images/generations", "generations_config"),
        Endpoint::Edits => ("/v1/images/edits", "edits_config"),
        Endpoint::Variations => ("/v1/images/variations", "variations_config"),
        Endpoint::Unspecified => ("this endpoint", "its config"),
    };
    let models = models
        .iter()
        .map(|model| format!("'{model}'"))
        .collect::<Vec<_>>()
        .join(", ");
    ApiError::TaskDisabled(format!(
        "{path} is disabled on this server: {key}.enabled is false for model {models}"
    ))
}

fn required_prompt(prompt: Option<String>) -> Result<String, ApiError> {
    match prompt {
        Some(prompt) if !prompt.trim().is_empty() => Ok(prompt),
        Some(_) => Err(ApiError::invalid("prompt", "prompt must not be empty")),
        None => Err(ApiError::invalid("prompt", "prompt is required")),
    }
}

/// The checks every endpoint shares. `auto_size` is what `size: "auto"` (or no size) means.
fn validate_common(
    purpose: Purpose,
    common: CommonFields,
    info: &InfoResponse,
    auto_size: (u32, u32),
) -> Result<ValidGeneration, ApiError> {
    let stream = common.stream.unwrap_or(false);
    // OpenAI streams images inline only; a url asked for would silently not come.
    if stream && common.response_format == Some(ResponseFormat::Url) {
        return Err(ApiError::invalid(
            "response_format",
            "streamed images are sent as b64_json; omit response_format or set it to b64_json",
        ));
    }
    let partial_images = common.partial_images.unwrap_or(0);
    if partial_images > MAX_PARTIAL_IMAGES {
        return Err(ApiError::invalid(
            "partial_images",
            format!(
                "partial_images must be between 0 and {MAX_PARTIAL_IMAGES}, got {partial_images}"
            ),
        ));
    }
    if common.background == Some(Background::Transparent) {
        return Err(ApiError::invalid(
            "background",
            "transparent backgrounds are not supported; use opaque or auto",
        ));
    }
    let limits = info.limits.unwrap_or_default();
    let max_n = info.max_n.max(1);
    let n = common.n.unwrap_or(1);
    if !(1..=max_n).contains(&n) {
        return Err(ApiError::invalid(
            "n",
            format!("n must be between 1 and {max_n}, got {n}"),
        ));
    }
    let (width, height) = resolve_size(common.size.as_deref(), auto_size, &limits)?;
    let (num_inference_steps, guidance_scale) = resolve_steps_and_guidance(
        common.quality.as_deref(),
        common.num_inference_steps,
        common.guidance_scale,
        info,
        &limits,
    )?;
    let scheduler = match common.scheduler {
        None => String::new(),
        Some(name) if info.schedulers.contains(&name) => name,
        Some(name) => {
            return Err(ApiError::invalid(
                "scheduler",
                format!(
                    "unknown scheduler '{name}'; available: {}",
                    info.schedulers.join(", ")
                ),
            ))
        }
    };
    let loras = resolve_loras(common.lora_settings.unwrap_or_default(), info)?;
    let max_sequence_length = match (common.max_sequence_length, limits.max_sequence_length) {
        // CLIP-only models have a fixed window: nothing to forward.
        (_, 0) | (None, _) => None,
        (Some(length), limit) if (1..=limit).contains(&length) => Some(length),
        (Some(length), limit) => {
            return Err(ApiError::invalid(
                "max_sequence_length",
                format!("max_sequence_length must be between 1 and {limit}, got {length}"),
            ))
        }
    };
    if let Some(compression) = common.output_compression {
        if compression > 100 {
            return Err(ApiError::invalid(
                "output_compression",
                format!("output_compression must be between 0 and 100, got {compression}"),
            ));
        }
    }
    Ok(ValidGeneration {
        endpoint: purpose.endpoint,
        task: purpose.task,
        prompt: purpose.prompt,
        negative_prompt: common.negative_prompt,
        n,
        width,
        height,
        seed: common.seed,
        num_inference_steps,
        guidance_scale,
        scheduler,
        loras,
        max_sequence_length,
        response_format: if stream {
            ResponseFormat::B64Json
        } else {
            common
                .response_format
                .unwrap_or_else(|| default_response_format(common.model.as_deref()))
        },
        output_format: common.output_format.unwrap_or_default(),
        output_compression: common.output_compression,
        quality: common.quality.unwrap_or_else(|| "auto".to_string()),
        background: common.background.unwrap_or(Background::Auto),
        stream,
        partial_images: if stream { partial_images } else { 0 },
        stream_progress: stream && common.stream_progress.unwrap_or(false),
        strength: None,
        images: Vec::new(),
        mask: None,
    })
}

/// OpenAI's gpt-image models always answer inline, and clients written for them (LibreChat, n8n)
/// read `b64_json` without asking for it; every other model defaults to `url`, as OpenAI's do.
fn default_response_format(model: Option<&str>) -> ResponseFormat {
    match model {
        Some(name) if name.starts_with("gpt-image") => ResponseFormat::B64Json,
        _ => ResponseFormat::Url,
    }
}

/// `size` → (width, height); see the module docs for the rules.
fn resolve_size(
    size: Option<&str>,
    auto_size: (u32, u32),
    limits: &Limits,
) -> Result<(u32, u32), ApiError> {
    let (width, height) = match size {
        None | Some("auto") => auto_size,
        Some(text) => parse_size(text).ok_or_else(|| {
            ApiError::invalid(
                "size",
                format!(
                    "size must be \"WIDTHxHEIGHT\" (e.g. \"512x512\") or \"auto\", got '{text}'"
                ),
            )
        })?,
    };
    let multiple = size_multiple(limits);
    if width == 0 || height == 0 || width % multiple != 0 || height % multiple != 0 {
        return Err(ApiError::invalid(
            "size",
            format!(
                "width and height must be positive multiples of {multiple}, got {width}x{height}"
            ),
        ));
    }
    let max_pixels = max_pixels(limits);
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(ApiError::invalid(
            "size",
            format!("{width}x{height} is larger than this model's limit of {max_pixels} pixels"),
        ));
    }
    Ok((width, height))
}

/// The limits requests are checked against: the worker's, with the fallbacks where it reports
/// 0. `/v1/models` reports these, so a UI offers what will be accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EffectiveLimits {
    pub size_multiple: u32,
    pub max_pixels: u64,
    pub max_steps: u32,
}

impl EffectiveLimits {
    pub fn of(info: &InfoResponse) -> Self {
        let limits = info.limits.unwrap_or_default();
        EffectiveLimits {
            size_multiple: size_multiple(&limits),
            max_pixels: max_pixels(&limits),
            max_steps: max_steps(&limits),
        }
    }
}

fn size_multiple(limits: &Limits) -> u32 {
    limits.size_multiple.max(MIN_SIZE_MULTIPLE)
}

fn max_pixels(limits: &Limits) -> u64 {
    match limits.max_pixels {
        0 => FALLBACK_MAX_PIXELS,
        max => max,
    }
}

fn max_steps(limits: &Limits) -> u32 {
    match limits.max_steps {
        0 => FALLBACK_MAX_STEPS,
        max => max,
    }
}

/// An input's size made valid for the model: scaled down (aspect kept) to fit `max_pixels`,
/// each side rounded to the size multiple (at least one multiple). Rounding to the nearest
/// multiple can overshoot the limit; then both sides round down instead, and an input too thin
/// to fit even so has its long side cut to what the limit allows.
fn fit_size(width: u32, height: u32, limits: &Limits) -> (u32, u32) {
    let multiple = size_multiple(limits);
    let max_pixels = max_pixels(limits);
    let area = u64::from(width) * u64::from(height);
    let scale = (max_pixels as f64 / area.max(1) as f64).sqrt().min(1.0);
    let side = |length: u32, round: fn(f64) -> f64| -> u32 {
        let multiples = round(f64::from(length) * scale / f64::from(multiple)).max(1.0);
        (multiples as u32).saturating_mul(multiple)
    };
    let fits = |w: u32, h: u32| u64::from(w) * u64::from(h) <= max_pixels;
    let (w, h) = (side(width, f64::round), side(height, f64::round));
    if fits(w, h) {
        return (w, h);
    }
    let (w, h) = (side(width, f64::floor), side(height, f64::floor));
    if fits(w, h) {
        return (w, h);
    }
    let longest = |short: u32| -> u32 {
        let multiples = (max_pixels / u64::from(short) / u64::from(multiple)).max(1);
        u32::try_from(multiples).unwrap_or(u32::MAX / multiple) * multiple
    };
    if w >= h {
        (longest(h), h)
    } else {
        (w, longest(w))
    }
}

/// `strength` in (0, 1]; absent = the model's default (when it reports one).
fn resolve_strength(strength: Option<f64>, info: &InfoResponse) -> Result<Option<f32>, ApiError> {
    let in_range = |value: &f32| *value > 0.0 && *value <= 1.0;
    match strength {
        None => Ok(info
            .defaults
            .as_ref()
            .map(|defaults| defaults.strength)
            .filter(in_range)),
        Some(value) => finite_f32(value).filter(in_range).map(Some).ok_or_else(|| {
            ApiError::invalid(
                "strength",
                format!("strength must be greater than 0 and at most 1, got {value}"),
            )
        }),
    }
}

/// `"512x768"` → (512, 768); digits only, so signs, spaces and fractions are refused.
fn parse_size(text: &str) -> Option<(u32, u32)> {
    let (width, height) = text.split_once('x')?;
    let number = |part: &str| -> Option<u32> {
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    Some((number(width)?, number(height)?))
}

/// Preset or global defaults first, then each explicit override on its own.
fn resolve_steps_and_guidance(
    quality: Option<&str>,
    steps: Option<u32>,
    guidance: Option<f64>,
    info: &InfoResponse,
    limits: &Limits,
) -> Result<(Option<u32>, Option<f32>), ApiError> {
    let defaults = info
        .defaults
        .as_ref()
        .map(|d| (Some(d.num_inference_steps), Some(d.guidance_scale)))
        .unwrap_or((None, None));
    let (base_steps, base_guidance) = match quality {
        None => defaults,
        Some(name) => match info.presets.iter().find(|p| p.name == name) {
            Some(preset) => (
                Some(preset.num_inference_steps),
                Some(preset.guidance_scale),
            ),
            None if OPENAI_QUALITIES.contains(&name) => defaults,
            None => {
                let mut known: Vec<&str> = info.presets.iter().map(|p| p.name.as_str()).collect();
                // A preset may carry an OpenAI name (`hd`, `standard`): list each name once.
                for name in OPENAI_QUALITIES {
                    if !known.contains(name) {
                        known.push(name);
                    }
                }
                return Err(ApiError::invalid(
                    "quality",
                    format!("unknown quality '{name}'; available: {}", known.join(", ")),
                ));
            }
        },
    };
    let max_steps = max_steps(limits);
    if let Some(steps) = steps {
        if !(1..=max_steps).contains(&steps) {
            return Err(ApiError::invalid(
                "num_inference_steps",
                format!("num_inference_steps must be between 1 and {max_steps}, got {steps}"),
            ));
        }
    }
    let guidance = match guidance {
        None => base_guidance,
        Some(value) => Some(finite_f32(value).filter(|v| *v >= 0.0).ok_or_else(|| {
            ApiError::invalid(
                "guidance_scale",
                format!("guidance_scale must be a finite number >= 0, got {value}"),
            )
        })?),
    };
    Ok((steps.or(base_steps), guidance))
}

fn resolve_loras(
    settings: Vec<LoraSetting>,
    info: &InfoResponse,
) -> Result<Vec<(String, f32)>, ApiError> {
    settings
        .into_iter()
        .map(|setting| {
            if !info.loras.contains(&setting.name) {
                let available = if info.loras.is_empty() {
                    "none are loaded".to_string()
                } else {
                    format!("available: {}", info.loras.join(", "))
                };
                return Err(ApiError::invalid(
                    "lora_settings",
                    format!("unknown LoRA '{}'; {available}", setting.name),
                ));
            }
            let weight = finite_f32(setting.weight).ok_or_else(|| {
                ApiError::invalid(
                    "lora_settings",
                    format!("weight of LoRA '{}' must be a finite number", setting.name),
                )
            })?;
            Ok((setting.name, weight))
        })
        .collect()
}

/// `value` as an f32 if it is finite in f32 (1e300 is finite in f64 but not in f32).
fn finite_f32(value: f64) -> Option<f32> {
    let narrowed = value as f32;
    narrowed.is_finite().then_some(narrowed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fastfusion_proto::{Defaults, Preset};

    fn info() -> InfoResponse {
        InfoResponse {
            model_id: "tiny-sd".into(),
            tasks: vec![Task::TextToImage as i32],
            endpoints: vec![
                Endpoint::Generations as i32,
                Endpoint::Edits as i32,
                Endpoint::Variations as i32,
            ],
            max_n: 4,
            presets: vec![
                Preset {
                    name: "hd".into(),
                    guidance_scale: 5.0,
                    num_inference_steps: 50,
                },
                Preset {
                    name: "fast".into(),
                    guidance_scale: 1.0,
                    num_inference_steps: 4,
                },
            ],
            loras: vec!["style".into()],
            native_width: 512,
            native_height: 512,
            limits: Some(Limits {
                max_pixels: 1024 * 1024,
                size_multiple: 8,
                max_steps: 100,
                ..Default::default()
            }),
            defaults: Some(Defaults {
                guidance_scale: 7.5,
                num_inference_steps: 25,
                scheduler: "pndm".into(),
                strength: 0.8,
            }),
            schedulers: vec!["pndm".into(), "euler".into()],
            ..Default::default()
        }
    }

    fn request(prompt: &str) -> ImageGenerationRequest {
        ImageGenerationRequest {
            common: CommonFields {
                prompt: Some(prompt.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// `request` with some of its shared fields changed.
    fn tweak(
        mut request: ImageGenerationRequest,
        change: impl FnOnce(&mut CommonFields),
    ) -> ImageGenerationRequest {
        change(&mut request.common);
        request
    }

    fn tweak_edit(
        mut request: ImageEditRequest,
        change: impl FnOnce(&mut CommonFields),
    ) -> ImageEditRequest {
        change(&mut request.common);
        request
    }

    fn param_of<T: std::fmt::Debug>(result: Result<T, ApiError>) -> String {
        match result {
            Err(ApiError::InvalidRequest {
                param: Some(param), ..
            }) => param,
            other => panic!("expected a 400 naming a param, got {other:?}"),
        }
    }

    #[test]
    fn defaults_fill_everything() {
        let valid = validate_generation(request("a cat"), &info()).expect("valid");
        assert_eq!((valid.width, valid.height, valid.n), (512, 512, 1));
        assert_eq!(valid.num_inference_steps, Some(25));
        assert_eq!(valid.guidance_scale, Some(7.5));
        assert_eq!(valid.scheduler, "");
        assert_eq!(valid.quality, "auto");
        assert_eq!(valid.response_format, ResponseFormat::Url);
        assert_eq!(valid.output_format, OutputFormat::Png);
        let proto = valid.to_proto("req-1");
        assert_eq!(proto.task, Task::TextToImage as i32);
        assert_eq!(proto.endpoint, Endpoint::Generations as i32);
        assert!(proto.images.is_empty() && proto.mask.is_none() && proto.strength.is_none());
        assert_eq!(proto.request_id, "req-1");
        assert_eq!((proto.width, proto.height), (512, 512));
    }

    #[test]
    fn prompt_must_be_present_and_not_blank() {
        assert_eq!(
            param_of(validate_generation(request("  \n"), &info())),
            "prompt"
        );
        let missing = ImageGenerationRequest::default();
        assert_eq!(param_of(validate_generation(missing, &info())), "prompt");
    }

    #[test]
    fn n_is_bounded_by_max_n() {
        for n in [0, 5] {
            let r = tweak(request("x"), |c| {
                c.n = Some(n);
            });
            assert_eq!(param_of(validate_generation(r, &info())), "n");
        }
        let r = tweak(request("x"), |c| {
            c.n = Some(4);
        });
        assert_eq!(validate_generation(r, &info()).map(|v| v.n).ok(), Some(4));
    }

    #[test]
    fn size_rules() {
        let size = |s: &str| {
            let r = tweak(request("x"), |c| {
                c.size = Some(s.into());
            });
            validate_generation(r, &info()).map(|v| (v.width, v.height))
        };
        assert_eq!(size("640x384").ok(), Some((640, 384)));
        assert_eq!(size("auto").ok(), Some((512, 512)));
        for bad in [
            "512",
            "512x",
            "x512",
            "-8x8",
            "512 x512",
            "5.5x8",
            "0x512",
            "516x512",
            "2048x2048",
            "512X512",
        ] {
            assert_eq!(param_of(size(bad)), "size", "{bad}");
        }
    }

    #[test]
    fn worker_size_multiple_applies_when_larger_than_8() {
        let mut info = info();
        info.limits = Some(Limits {
            size_multiple: 16,
            ..info.limits.unwrap_or_default()
        });
        let r = tweak(request("x"), |c| {
            c.size = Some("520x512".into());
        });
        assert_eq!(param_of(validate_generation(r, &info)), "size");
    }

    #[test]
    fn quality_presets_and_openai_fallback() {
        let quality = |q: &str| {
            let r = tweak(request("x"), |c| {
                c.quality = Some(q.into());
            });
            validate_generation(r, &info())
        };
        let hd = quality("hd").expect("preset");
        assert_eq!(
            (hd.num_inference_steps, hd.guidance_scale),
            (Some(50), Some(5.0))
        );
        assert_eq!(hd.quality, "hd");
        let fast = quality("fast").expect("preset");
        assert_eq!(fast.num_inference_steps, Some(4));
        // OpenAI names without a preset of that name fall back to the global defaults.
        for name in ["standard", "low", "medium", "high", "xhigh", "max", "auto"] {
            let v = quality(name).expect("openai quality");
            assert_eq!(
                (v.num_inference_steps, v.guidance_scale),
                (Some(25), Some(7.5))
            );
        }
        assert_eq!(param_of(quality("ultra")), "quality");
        // The preset named `hd` is an OpenAI name too: listed once.
        match quality("ultra") {
            Err(ApiError::InvalidRequest { message, .. }) => {
                let listed = message.split("available: ").nth(1).unwrap_or_default();
                let names: Vec<&str> = listed.split(", ").collect();
                assert_eq!(
                    names,
                    ["hd", "fast", "standard", "low", "medium", "high", "xhigh", "max", "auto"],
                    "{message}"
                );
            }
            other => panic!("expected a 400, got {other:?}"),
        }
        assert_eq!(param_of(quality("HD")), "quality");
    }

    #[test]
    fn overrides_apply_on_their_own() {
        let r = tweak(request("x"), |c| {
            c.quality = Some("hd".into());
            c.num_inference_steps = Some(10);
        });
        let v = validate_generation(r, &info()).expect("valid");
        assert_eq!(
            (v.num_inference_steps, v.guidance_scale),
            (Some(10), Some(5.0))
        );
        let r = tweak(request("x"), |c| {
            c.guidance_scale = Some(2.5);
        });
        let v = validate_generation(r, &info()).expect("valid");
        assert_eq!(
            (v.num_inference_steps, v.guidance_scale),
            (Some(25), Some(2.5))
        );
    }

    #[test]
    fn steps_and_guidance_bounds() {
        for steps in [0, 101] {
            let r = tweak(request("x"), |c| {
                c.num_inference_steps = Some(steps);
            });
            assert_eq!(
                param_of(validate_generation(r, &info())),
                "num_inference_steps"
            );
        }
        for guidance in [-0.5, 1e300, f64::NAN] {
            let r = tweak(request("x"), |c| {
                c.guidance_scale = Some(guidance);
            });
            assert_eq!(param_of(validate_generation(r, &info())), "guidance_scale");
        }
    }

    #[test]
    fn scheduler_and_loras_must_be_known() {
        let r = tweak(request("x"), |c| {
            c.scheduler = Some("lms".into());
        });
        assert_eq!(param_of(validate_generation(r, &info())), "scheduler");
        let r = tweak(request("x"), |c| {
            c.scheduler = Some("euler".into());
            c.lora_settings = Some(vec![crate::openai::LoraSetting {
                name: "style".into(),
                weight: 0.5,
            }]);
        });
        let v = validate_generation(r, &info()).expect("valid");
        assert_eq!(v.scheduler, "euler");
        assert_eq!(v.loras, vec![("style".to_string(), 0.5)]);
        let r = tweak(request("x"), |c| {
            c.lora_settings = Some(vec![crate::openai::LoraSetting {
                name: "other".into(),
                weight: 1.0,
            }]);
        });
        assert_eq!(param_of(validate_generation(r, &info())), "lora_settings");
    }

    #[test]
    fn max_sequence_length_is_checked_against_the_models_limit() {
        let with = |length: u32| tweak(request("x"), |c| c.max_sequence_length = Some(length));
        // A CLIP-only model ignores it.
        let v = validate_generation(with(4096), &info()).expect("ignored");
        assert_eq!(v.max_sequence_length, None);
        let mut flux = info();
        if let Some(limits) = flux.limits.as_mut() {
            limits.max_sequence_length = 512;
        }
        let v = validate_generation(with(256), &flux).expect("within the limit");
        assert_eq!(v.max_sequence_length, Some(256));
        assert_eq!(v.to_proto("r").max_sequence_length, Some(256));
        for bad in [0, 513] {
            assert_eq!(
                param_of(validate_generation(with(bad), &flux)),
                "max_sequence_length"
            );
        }
    }

    #[test]
    fn openai_only_fields() {
        let cases = [
            (
                tweak(request("x"), |c| {
                    c.background = Some(Background::Transparent);
                }),
                "background",
            ),
            (
                tweak(request("x"), |c| {
                    c.stream = Some(true);
                    c.response_format = Some(ResponseFormat::Url);
                }),
                "response_format",
            ),
            (
                tweak(request("x"), |c| {
                    c.partial_images = Some(4);
                }),
                "partial_images",
            ),
            (
                tweak(request("x"), |c| {
                    c.output_compression = Some(101);
                }),
                "output_compression",
            ),
            (
                ImageGenerationRequest {
                    style: Some("gothic".into()),
                    ..request("x")
                },
                "style",
            ),
        ];
        for (r, param) in cases {
            assert_eq!(param_of(validate_generation(r, &info())), param);
        }
        let ok = ImageGenerationRequest {
            moderation: Some("low".into()),
            style: Some("natural".into()),
            ..tweak(request("x"), |c| {
                c.background = Some(Background::Opaque);
                c.stream = Some(false);
                c.output_compression = Some(100);
            })
        };
        assert!(validate_generation(ok, &info()).is_ok());
    }

    #[test]
    fn streaming_inlines_images_and_asks_for_previews() {
        let r = tweak(request("x"), |c| {
            c.stream = Some(true);
            c.partial_images = Some(3);
        });
        let valid = validate_generation(r, &info()).expect("valid");
        assert!(valid.stream);
        assert_eq!(valid.response_format, ResponseFormat::B64Json);
        assert_eq!(valid.to_proto("r").partial_images, 3);
        assert_eq!(valid.background, Background::Auto);
        // Without stream the previews are accepted (as OpenAI does) but not asked for.
        let r = tweak(request("x"), |c| {
            c.partial_images = Some(2);
            c.background = Some(Background::Opaque);
        });
        let valid = validate_generation(r, &info()).expect("valid");
        assert!(!valid.stream);
        assert_eq!(valid.response_format, ResponseFormat::Url);
        assert_eq!(valid.to_proto("r").partial_images, 0);
        assert_eq!(valid.background, Background::Opaque);
        // Edits share the rules.
        let r = tweak_edit(edit("x"), |c| {
            c.stream = Some(true);
            c.partial_images = Some(4);
        });
        assert_eq!(
            param_of(validate_edit(r, vec![input(8, 8)], None, &info())),
            "partial_images"
        );
    }

    #[test]
    fn gpt_image_model_names_default_to_b64_json() {
        let format = |model: Option<&str>, asked: Option<ResponseFormat>| {
            let r = tweak(request("x"), |c| {
                c.model = model.map(str::to_string);
                c.response_format = asked;
            });
            validate_generation(r, &info()).map(|v| v.response_format)
        };
        for model in ["gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5"] {
            assert_eq!(
                format(Some(model), None).ok(),
                Some(ResponseFormat::B64Json)
            );
            // Asked for explicitly, a url is still a url.
            assert_eq!(
                format(Some(model), Some(ResponseFormat::Url)).ok(),
                Some(ResponseFormat::Url)
            );
        }
        for model in [None, Some("dall-e-2"), Some("tiny-sd")] {
            assert_eq!(
                format(model, None).ok(),
                Some(ResponseFormat::Url),
                "{model:?}"
            );
        }
        let r = tweak_edit(edit("x"), |c| c.model = Some("gpt-image-1".into()));
        let valid = validate_edit(r, vec![input(8, 8)], None, &info()).expect("valid");
        assert_eq!(valid.response_format, ResponseFormat::B64Json);
    }

    #[test]
    fn openai_values_accepted_and_ignored() {
        let r = ImageGenerationRequest {
            moderation: Some("low".into()),
            ..tweak(request("x"), |c| {
                c.safety_identifier = Some("user-1234".into());
                c.complexity = Some(serde_json::json!("high"));
                c.user = Some("someone".into());
            })
        };
        let with = validate_generation(r, &info()).expect("valid");
        let without = validate_generation(request("x"), &info()).expect("valid");
        assert_eq!(with, without);
        let r = ImageEditRequest {
            input_fidelity: Some("high".into()),
            ..tweak_edit(edit("x"), |c| {
                c.complexity = Some(serde_json::json!({"a": 1}))
            })
        };
        let with = validate_edit(r, vec![input(8, 8)], None, &info()).expect("valid");
        let without = validate_edit(edit("x"), vec![input(8, 8)], None, &info()).expect("valid");
        assert_eq!(with, without);
    }

    #[test]
    fn progress_events_only_when_streaming() {
        let progress = |stream: bool| {
            let r = tweak(request("x"), |c| {
                c.stream = Some(stream);
                c.stream_progress = Some(true);
            });
            validate_generation(r, &info()).map(|v| v.stream_progress)
        };
        assert_eq!(progress(true).ok(), Some(true));
        assert_eq!(progress(false).ok(), Some(false));
        assert!(!validate_generation(request("x"), &info())
            .map(|v| v.stream_progress)
            .unwrap_or(true));
    }

    #[test]
    fn disabled_endpoints_are_refused() {
        let mut info = info();
        info.endpoints = vec![Endpoint::Edits as i32];
        match validate_generation(request("x"), &info) {
            Err(ApiError::TaskDisabled(message)) => {
                assert!(message.contains("generations_config.enabled"), "{message}");
                assert!(message.contains("'tiny-sd'"), "{message}");
            }
            other => panic!("expected TaskDisabled, got {other:?}"),
        }
        assert!(validate_edit(edit("x"), vec![input(64, 64)], None, &info).is_ok());
        assert!(matches!(
            validate_variation(edit(""), vec![input(64, 64)], None, &info),
            Err(ApiError::TaskDisabled(_))
        ));
    }

    fn edit(prompt: &str) -> ImageEditRequest {
        ImageEditRequest {
            common: CommonFields {
                prompt: Some(prompt.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn input(width: u32, height: u32) -> InputImage {
        InputImage {
            param: "image".into(),
            bytes: bytes::Bytes::from(format!("{width}x{height}")),
            width,
            height,
        }
    }

    #[test]
    fn edits_carry_their_inputs_and_pick_the_task_from_the_mask() {
        let valid = validate_edit(
            edit("a hat"),
            vec![input(64, 48), input(32, 32)],
            Some(input(64, 48)),
            &info(),
        )
        .expect("valid");
        assert_eq!(
            (valid.endpoint, valid.task),
            (Endpoint::Edits, Task::Inpaint)
        );
        assert_eq!((valid.width, valid.height), (64, 48));
        assert_eq!(valid.strength, Some(0.8));
        let proto = valid.to_proto("r");
        assert_eq!(proto.images, vec![b"64x48".to_vec(), b"32x32".to_vec()]);
        assert_eq!(proto.mask.as_deref(), Some(&b"64x48"[..]));
        assert_eq!(proto.endpoint, Endpoint::Edits as i32);
        assert_eq!(proto.task, Task::Inpaint as i32);
        assert_eq!(proto.strength, Some(0.8));

        let r = ImageEditRequest {
            strength: Some(0.25),
            ..tweak_edit(edit("a hat"), |c| {
                c.size = Some("128x64".into());
            })
        };
        let valid = validate_edit(r, vec![input(64, 48)], None, &info()).expect("valid");
        assert_eq!(valid.task, Task::ImageToImage);
        assert_eq!(valid.strength, Some(0.25));
        assert_eq!((valid.width, valid.height), (128, 64));
        assert_eq!(valid.mask, None);
    }

    #[test]
    fn edits_need_a_prompt_an_image_and_a_strength_in_range() {
        assert_eq!(
            param_of(validate_edit(edit(" "), vec![input(8, 8)], None, &info())),
            "prompt"
        );
        assert_eq!(
            param_of(validate_edit(edit("x"), vec![], None, &info())),
            "image"
        );
        for strength in [0.0, -0.1, 1.01, f64::NAN, f64::INFINITY] {
            let r = ImageEditRequest {
                strength: Some(strength),
                ..edit("x")
            };
            assert_eq!(
                param_of(validate_edit(r, vec![input(8, 8)], None, &info())),
                "strength",
                "{strength}"
            );
        }
        let r = ImageEditRequest {
            strength: Some(1.0),
            ..edit("x")
        };
        assert!(validate_edit(r, vec![input(8, 8)], None, &info()).is_ok());
        // The shared rules apply to edits too.
        let r = tweak_edit(edit("x"), |c| {
            c.n = Some(9);
        });
        assert_eq!(
            param_of(validate_edit(r, vec![input(8, 8)], None, &info())),
            "n"
        );
    }

    #[test]
    fn variations_take_one_image_no_mask_and_an_optional_prompt() {
        let valid =
            validate_variation(edit("  "), vec![input(64, 64)], None, &info()).expect("valid");
        assert_eq!(valid.prompt, "");
        assert_eq!(
            (valid.endpoint, valid.task),
            (Endpoint::Variations, Task::ImageToImage)
        );
        let valid = validate_variation(edit("in winter"), vec![input(64, 64)], None, &info())
            .expect("valid");
        assert_eq!(valid.prompt, "in winter");
        assert_eq!(
            param_of(validate_variation(
                edit(""),
                vec![input(8, 8), input(8, 8)],
                None,
                &info()
            )),
            "image"
        );
        assert_eq!(
            param_of(validate_variation(
                edit(""),
                vec![input(8, 8)],
                Some(input(8, 8)),
                &info()
            )),
            "mask"
        );
        assert_eq!(
            param_of(validate_variation(edit(""), vec![], None, &info())),
            "image"
        );
    }

    #[test]
    fn auto_size_follows_the_input() {
        let limits = Limits {
            max_pixels: 65536,
            size_multiple: 8,
            ..Default::default()
        };
        // Already valid: kept.
        assert_eq!(fit_size(128, 64, &limits), (128, 64));
        // Rounded to the nearest multiple of 8.
        assert_eq!(fit_size(100, 61, &limits), (104, 64));
        // Too large: scaled down keeping the aspect (1024x512 → 362x181 → 360x184 > limit → 360x176).
        let (w, h) = fit_size(1024, 512, &limits);
        assert!(u64::from(w) * u64::from(h) <= 65536, "{w}x{h}");
        assert_eq!((w % 8, h % 8), (0, 0));
        assert!((f64::from(w) / f64::from(h) - 2.0).abs() < 0.1, "{w}x{h}");
        // Tiny and absurdly thin inputs still give a valid size.
        assert_eq!(fit_size(3, 3, &limits), (8, 8));
        let (w, h) = fit_size(1, 100_000, &limits);
        assert_eq!(w, 8);
        assert!(
            u64::from(w) * u64::from(h) <= 65536 && h % 8 == 0,
            "{w}x{h}"
        );
        // And through validation, with a multiple of 16.
        let mut info = info();
        info.limits = Some(Limits {
            size_multiple: 16,
            ..limits
        });
        let valid = validate_edit(edit("x"), vec![input(100, 61)], None, &info).expect("valid");
        assert_eq!((valid.width, valid.height), (96, 64));
        let r = tweak_edit(edit("x"), |c| {
            c.size = Some("auto".into());
        });
        let valid = validate_edit(r, vec![input(300, 200)], None, &info).expect("valid");
        assert!(valid.width * valid.height <= 65536);
        assert_eq!((valid.width % 16, valid.height % 16), (0, 0));
    }
}
