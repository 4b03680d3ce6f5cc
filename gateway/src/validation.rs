//! Raw OpenAI requests + the target model's `InfoResponse` → [`ValidGeneration`], or a 400 naming
//! the parameter at fault.
//!
//! Only a `ValidGeneration` travels on to the worker; it carries every setting resolved (size,
//! steps, guidance), so the worker never has to guess what the client meant. The rules:
//!
//! - `size`: `"WIDTHxHEIGHT"`, both positive multiples of `max(8, limits.size_multiple)`, at most
//!   `limits.max_pixels` pixels. `"auto"` or absent gives the model's native size. (OpenAI's and the
//!   seed's default, 1024x1024, is FLUX's and SDXL's native size; SD 1.5's is 512x512. Each model
//!   does best at its own native size, so that is what "auto" means here.)
//! - `quality` picks a preset from `generation_presets` by name. OpenAI's own values (standard, hd,
//!   low, medium, high, auto) fall back to the global defaults when no preset has that name; any
//!   other value is an error. `guidance_scale` and `num_inference_steps` then override on their own.
//! - `scheduler` must be one the worker lists; `lora_settings` names must be loaded LoRAs.

use fastfusion_proto::{InfoResponse, Limits, Task};

use crate::error::ApiError;
use crate::openai::{Background, ImageGenerationRequest, OutputFormat, ResponseFormat};

/// OpenAI's `quality` values; they select the global defaults unless a preset has that name.
const OPENAI_QUALITIES: &[&str] = &["standard", "hd", "low", "medium", "high", "auto"];
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

/// A text-to-image request with every setting checked and resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidGeneration {
    pub prompt: String,
    /// Empty = the unconditional prompt.
    pub negative_prompt: String,
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
    pub response_format: ResponseFormat,
    pub output_format: OutputFormat,
    pub output_compression: Option<u32>,
    /// Echoed in the response: the quality asked for, or `"auto"`.
    pub quality: String,
}

impl ValidGeneration {
    /// The gRPC request for the worker; `request_id` correlates gateway and worker logs.
    pub fn to_proto(&self, request_id: &str) -> fastfusion_proto::GenerateRequest {
        fastfusion_proto::GenerateRequest {
            request_id: request_id.to_string(),
            task: Task::TextToImage as i32,
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            n: self.n,
            width: self.width,
            height: self.height,
            seed: self.seed,
            num_inference_steps: self.num_inference_steps,
            guidance_scale: self.guidance_scale,
            scheduler: self.scheduler.clone(),
            loras: self
                .loras
                .iter()
                .map(|(name, weight)| fastfusion_proto::LoraSetting {
                    name: name.clone(),
                    weight: *weight,
                })
                .collect(),
            output_format: self.output_format.to_proto() as i32,
            output_compression: self.output_compression,
            ..Default::default()
        }
    }

    /// `"WIDTHxHEIGHT"`, as the response reports it.
    pub fn size(&self) -> String {
        format!("{}x{}", self.width, self.height)
    }
}

/// Checks a generation request against what the model serving it can do.
pub fn validate_generation(
    request: ImageGenerationRequest,
    info: &InfoResponse,
) -> Result<ValidGeneration, ApiError> {
    if !info.tasks.contains(&(Task::TextToImage as i32)) {
        return Err(ApiError::TaskDisabled(format!(
            "image generation is disabled for model '{}'",
            info.model_id
        )));
    }
    if request.stream == Some(true) {
        return Err(ApiError::invalid(
            "stream",
            "streaming responses are not supported yet; omit stream or set it to false",
        ));
    }
    if let Some(partial) = request.partial_images {
        if partial > MAX_PARTIAL_IMAGES {
            return Err(ApiError::invalid(
                "partial_images",
                format!("partial_images must be between 0 and {MAX_PARTIAL_IMAGES}, got {partial}"),
            ));
        }
    }
    if request.background == Some(Background::Transparent) {
        return Err(ApiError::invalid(
            "background",
            "transparent backgrounds are not supported; use opaque or auto",
        ));
    }
    if let Some(style) = &request.style {
        if !OPENAI_STYLES.contains(&style.as_str()) {
            return Err(ApiError::invalid(
                "style",
                format!("style must be vivid or natural, got '{style}'"),
            ));
        }
    }
    let prompt = match request.prompt {
        Some(prompt) if !prompt.trim().is_empty() => prompt,
        Some(_) => return Err(ApiError::invalid("prompt", "prompt must not be empty")),
        None => return Err(ApiError::invalid("prompt", "prompt is required")),
    };
    let limits = info.limits.unwrap_or_default();
    let max_n = info.max_n.max(1);
    let n = request.n.unwrap_or(1);
    if !(1..=max_n).contains(&n) {
        return Err(ApiError::invalid(
            "n",
            format!("n must be between 1 and {max_n}, got {n}"),
        ));
    }
    let (width, height) = resolve_size(request.size.as_deref(), info, &limits)?;
    let (num_inference_steps, guidance_scale) = resolve_steps_and_guidance(
        request.quality.as_deref(),
        request.num_inference_steps,
        request.guidance_scale,
        info,
        &limits,
    )?;
    let scheduler = match request.scheduler {
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
    let loras = resolve_loras(request.lora_settings.unwrap_or_default(), info)?;
    if let Some(compression) = request.output_compression {
        if compression > 100 {
            return Err(ApiError::invalid(
                "output_compression",
                format!("output_compression must be between 0 and 100, got {compression}"),
            ));
        }
    }
    Ok(ValidGeneration {
        prompt,
        negative_prompt: request.negative_prompt.unwrap_or_default(),
        n,
        width,
        height,
        seed: request.seed,
        num_inference_steps,
        guidance_scale,
        scheduler,
        loras,
        response_format: request.response_format.unwrap_or_default(),
        output_format: request.output_format.unwrap_or_default(),
        output_compression: request.output_compression,
        quality: request.quality.unwrap_or_else(|| "auto".to_string()),
    })
}

/// `size` → (width, height); see the module docs for the rules.
fn resolve_size(
    size: Option<&str>,
    info: &InfoResponse,
    limits: &Limits,
) -> Result<(u32, u32), ApiError> {
    let (width, height) = match size {
        None | Some("auto") => (info.native_width, info.native_height),
        Some(text) => parse_size(text).ok_or_else(|| {
            ApiError::invalid(
                "size",
                format!(
                    "size must be \"WIDTHxHEIGHT\" (e.g. \"512x512\") or \"auto\", got '{text}'"
                ),
            )
        })?,
    };
    let multiple = limits.size_multiple.max(MIN_SIZE_MULTIPLE);
    if width == 0 || height == 0 || width % multiple != 0 || height % multiple != 0 {
        return Err(ApiError::invalid(
            "size",
            format!(
                "width and height must be positive multiples of {multiple}, got {width}x{height}"
            ),
        ));
    }
    let max_pixels = match limits.max_pixels {
        0 => FALLBACK_MAX_PIXELS,
        max => max,
    };
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(ApiError::invalid(
            "size",
            format!("{width}x{height} is larger than this model's limit of {max_pixels} pixels"),
        ));
    }
    Ok((width, height))
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
                known.extend(OPENAI_QUALITIES);
                return Err(ApiError::invalid(
                    "quality",
                    format!("unknown quality '{name}'; available: {}", known.join(", ")),
                ));
            }
        },
    };
    let max_steps = match limits.max_steps {
        0 => FALLBACK_MAX_STEPS,
        max => max,
    };
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
    settings: Vec<crate::openai::LoraSetting>,
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
            prompt: Some(prompt.into()),
            ..Default::default()
        }
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
            let r = ImageGenerationRequest {
                n: Some(n),
                ..request("x")
            };
            assert_eq!(param_of(validate_generation(r, &info())), "n");
        }
        let r = ImageGenerationRequest {
            n: Some(4),
            ..request("x")
        };
        assert_eq!(validate_generation(r, &info()).map(|v| v.n).ok(), Some(4));
    }

    #[test]
    fn size_rules() {
        let size = |s: &str| {
            let r = ImageGenerationRequest {
                size: Some(s.into()),
                ..request("x")
            };
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
        let r = ImageGenerationRequest {
            size: Some("520x512".into()),
            ..request("x")
        };
        assert_eq!(param_of(validate_generation(r, &info)), "size");
    }

    #[test]
    fn quality_presets_and_openai_fallback() {
        let quality = |q: &str| {
            let r = ImageGenerationRequest {
                quality: Some(q.into()),
                ..request("x")
            };
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
        for name in ["standard", "low", "medium", "high", "auto"] {
            let v = quality(name).expect("openai quality");
            assert_eq!(
                (v.num_inference_steps, v.guidance_scale),
                (Some(25), Some(7.5))
            );
        }
        assert_eq!(param_of(quality("ultra")), "quality");
        assert_eq!(param_of(quality("HD")), "quality");
    }

    #[test]
    fn overrides_apply_on_their_own() {
        let r = ImageGenerationRequest {
            quality: Some("hd".into()),
            num_inference_steps: Some(10),
            ..request("x")
        };
        let v = validate_generation(r, &info()).expect("valid");
        assert_eq!(
            (v.num_inference_steps, v.guidance_scale),
            (Some(10), Some(5.0))
        );
        let r = ImageGenerationRequest {
            guidance_scale: Some(2.5),
            ..request("x")
        };
        let v = validate_generation(r, &info()).expect("valid");
        assert_eq!(
            (v.num_inference_steps, v.guidance_scale),
            (Some(25), Some(2.5))
        );
    }

    #[test]
    fn steps_and_guidance_bounds() {
        for steps in [0, 101] {
            let r = ImageGenerationRequest {
                num_inference_steps: Some(steps),
                ..request("x")
            };
            assert_eq!(
                param_of(validate_generation(r, &info())),
                "num_inference_steps"
            );
        }
        for guidance in [-0.5, 1e300, f64::NAN] {
            let r = ImageGenerationRequest {
                guidance_scale: Some(guidance),
                ..request("x")
            };
            assert_eq!(param_of(validate_generation(r, &info())), "guidance_scale");
        }
    }

    #[test]
    fn scheduler_and_loras_must_be_known() {
        let r = ImageGenerationRequest {
            scheduler: Some("lms".into()),
            ..request("x")
        };
        assert_eq!(param_of(validate_generation(r, &info())), "scheduler");
        let r = ImageGenerationRequest {
            scheduler: Some("euler".into()),
            lora_settings: Some(vec![crate::openai::LoraSetting {
                name: "style".into(),
                weight: 0.5,
            }]),
            ..request("x")
        };
        let v = validate_generation(r, &info()).expect("valid");
        assert_eq!(v.scheduler, "euler");
        assert_eq!(v.loras, vec![("style".to_string(), 0.5)]);
        let r = ImageGenerationRequest {
            lora_settings: Some(vec![crate::openai::LoraSetting {
                name: "other".into(),
                weight: 1.0,
            }]),
            ..request("x")
        };
        assert_eq!(param_of(validate_generation(r, &info())), "lora_settings");
    }

    #[test]
    fn openai_only_fields() {
        let cases = [
            (
                ImageGenerationRequest {
                    background: Some(Background::Transparent),
                    ..request("x")
                },
                "background",
            ),
            (
                ImageGenerationRequest {
                    stream: Some(true),
                    ..request("x")
                },
                "stream",
            ),
            (
                ImageGenerationRequest {
                    partial_images: Some(4),
                    ..request("x")
                },
                "partial_images",
            ),
            (
                ImageGenerationRequest {
                    output_compression: Some(101),
                    ..request("x")
                },
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
            background: Some(Background::Opaque),
            moderation: Some("low".into()),
            stream: Some(false),
            style: Some("natural".into()),
            output_compression: Some(100),
            ..request("x")
        };
        assert!(validate_generation(ok, &info()).is_ok());
    }

    #[test]
    fn disabled_task_is_refused() {
        let mut info = info();
        info.tasks = vec![Task::ImageToImage as i32];
        match validate_generation(request("x"), &info) {
            Err(ApiError::TaskDisabled(_)) => {}
            other => panic!("expected TaskDisabled, got {other:?}"),
        }
    }
}
