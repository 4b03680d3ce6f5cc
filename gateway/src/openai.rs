//! The OpenAI Images API wire types, as the openai-python SDK sends and receives them.
//!
//! [`ImageGenerationRequest`] and [`ImageEditRequest`] are the raw request bodies: the fields all
//! image endpoints share live once in [`CommonFields`] (flattened into both), every field
//! optional so that `validation.rs` (not serde) decides what is missing and names it. Top-level
//! extensions (seed, negative_prompt, guidance_scale, num_inference_steps, scheduler,
//! lora_settings, stream_progress) sit beside OpenAI's own fields, as vLLM-Omni does. Unknown
//! fields are ignored (the SDK gains new ones) and logged at debug by [`crate::extract`].
//! [`ImagesResponse`] is what OpenAI returns, plus the seed of each image; [`Model`] is a
//! `/v1/models` entry with what the model's workers report.

use serde::{Deserialize, Serialize};

/// The fields generations, edits and variations share, flattened into each request type, so
/// the three endpoints parse, document and validate them once.
///
/// `user`, `safety_identifier` and `complexity` are accepted for OpenAI compatibility and not
/// used by the diffusion models (`complexity` takes any JSON value).
#[derive(Debug, Default, Clone, Deserialize, Serialize, utoipa::ToSchema)]
pub struct CommonFields {
    /// Required for generations and edits; optional for variations.
    pub prompt: Option<String>,
    pub model: Option<String>,
    pub n: Option<u32>,
    /// `"WIDTHxHEIGHT"` or `"auto"`: the model's native size for generations, the first input's
    /// size for edits and variations (the default there).
    pub size: Option<String>,
    /// A `generation_presets` name, or one of OpenAI's (standard, hd, low, medium, high, xhigh,
    /// max, auto).
    pub quality: Option<String>,
    pub user: Option<String>,
    /// Default `url`; `b64_json` when `model` names one of OpenAI's gpt-image models, which
    /// always answer inline.
    pub response_format: Option<ResponseFormat>,
    pub output_format: Option<OutputFormat>,
    pub output_compression: Option<u32>,
    pub background: Option<Background>,
    /// `true`: answer with server-sent events ([`ImageStreamEvent`]) instead of one JSON body.
    pub stream: Option<bool>,
    /// Previews sent before each final image when streaming, 0..=3; ignored without `stream`.
    pub partial_images: Option<u32>,
    /// Extension, streaming only: also send `fastfusion.progress` events (queue position,
    /// denoising step).
    pub stream_progress: Option<bool>,
    pub safety_identifier: Option<String>,
    pub complexity: Option<serde_json::Value>,
    // Extensions.
    pub seed: Option<u64>,
    pub negative_prompt: Option<String>,
    pub guidance_scale: Option<f64>,
    pub num_inference_steps: Option<u32>,
    pub scheduler: Option<String>,
    pub lora_settings: Option<Vec<LoraSetting>>,
    /// FLUX: T5 tokens the prompt is padded or truncated to (the model's default when absent);
    /// ignored by models without T5.
    pub max_sequence_length: Option<u32>,
}

impl CommonFields {
    /// Every field name, as clients send them.
    pub const FIELDS: &'static [&'static str] = &[
        "prompt",
        "model",
        "n",
        "size",
        "quality",
        "user",
        "response_format",
        "output_format",
        "output_compression",
        "background",
        "stream",
        "partial_images",
        "stream_progress",
        "safety_identifier",
        "complexity",
        "seed",
        "negative_prompt",
        "guidance_scale",
        "num_inference_steps",
        "scheduler",
        "lora_settings",
        "max_sequence_length",
    ];
}

/// `POST /v1/images/generations` as received.
///
/// `moderation` is accepted for SDK compatibility and ignored: FastFusion runs no content filter.
/// `style` is accepted and not used by the diffusion models.
#[derive(Debug, Default, Clone, Deserialize, Serialize, utoipa::ToSchema)]
pub struct ImageGenerationRequest {
    #[serde(flatten)]
    pub common: CommonFields,
    pub style: Option<String>,
    pub moderation: Option<String>,
}

impl ImageGenerationRequest {
    /// The fields only generations have, beside [`CommonFields::FIELDS`].
    pub const OWN_FIELDS: &'static [&'static str] = &["style", "moderation"];
}

/// `POST /v1/images/edits` and `POST /v1/images/variations` as received, from a multipart form
/// (every text part; files travel beside it as uploads) or from the JSON body form of edits.
///
/// Variations use the same fields: there `prompt` is optional. `input_fidelity` (OpenAI's, for
/// its own models) is accepted and not used; `markup` (OpenAI's drawn annotations) is refused.
#[derive(Debug, Default, Clone, Deserialize, Serialize, utoipa::ToSchema)]
pub struct ImageEditRequest {
    #[serde(flatten)]
    pub common: CommonFields,
    pub input_fidelity: Option<String>,
    /// How much of the denoising schedule runs over the input, 0 < strength <= 1.
    pub strength: Option<f64>,
    /// JSON form only: the input images; the first is the one edited.
    pub images: Option<Vec<ImageReference>>,
    /// JSON form only: the mask for the first image.
    pub mask: Option<ImageReference>,
    /// Not supported: any value is a 400 naming `markup`.
    pub markup: Option<serde_json::Value>,
}

impl ImageEditRequest {
    /// The fields only edits and variations have, beside [`CommonFields::FIELDS`].
    pub const OWN_FIELDS: &'static [&'static str] =
        &["input_fidelity", "strength", "images", "mask", "markup"];
}

/// An input image in the JSON form: `{"image_url": "data:image/png;base64,..."}`. OpenAI also
/// allows `file_id` (its Files API) and http(s) urls; the gateway has no Files API and fetches
/// nothing remote, so both are refused with a 400 naming them.
#[derive(Debug, Default, Clone, Deserialize, Serialize, utoipa::ToSchema)]
pub struct ImageReference {
    pub image_url: Option<String>,
    pub file_id: Option<String>,
}

/// One entry of `lora_settings`: a LoRA adapter name from the model config and its weight.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
pub struct LoraSetting {
    pub name: String,
    #[serde(default = "default_lora_weight")]
    pub weight: f64,
}

fn default_lora_weight() -> f64 {
    1.0
}

/// How images come back: a link to `/v1/images/data/{id}` or the bytes inline as base64.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResponseFormat {
    #[default]
    Url,
    B64Json,
}

/// The encoding of the returned images. Other names OpenAI knows (`gif`, `svg`) are refused with
/// a message saying which formats this server makes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum OutputFormat {
    #[default]
    Png,
    Jpeg,
    Webp,
}

impl TryFrom<String> for OutputFormat {
    type Error = String;

    fn try_from(name: String) -> Result<Self, Self::Error> {
        match name.as_str() {
            "png" => Ok(OutputFormat::Png),
            "jpeg" => Ok(OutputFormat::Jpeg),
            "webp" => Ok(OutputFormat::Webp),
            other => Err(format!(
                "'{other}' is not an image format this server makes; use png, jpeg or webp"
            )),
        }
    }
}

impl OutputFormat {
    /// File extension used by the image store (`jpg`, as OpenAI's own file names use).
    pub fn extension(self) -> &'static str {
        match self {
            OutputFormat::Png => "png",
            OutputFormat::Jpeg => "jpg",
            OutputFormat::Webp => "webp",
        }
    }

    /// The inverse of [`OutputFormat::extension`].
    pub fn from_extension(extension: &str) -> Option<Self> {
        match extension {
            "png" => Some(OutputFormat::Png),
            "jpg" => Some(OutputFormat::Jpeg),
            "webp" => Some(OutputFormat::Webp),
            _ => None,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            OutputFormat::Png => "image/png",
            OutputFormat::Jpeg => "image/jpeg",
            OutputFormat::Webp => "image/webp",
        }
    }

    /// The name used in requests and responses.
    pub fn name(self) -> &'static str {
        match self {
            OutputFormat::Png => "png",
            OutputFormat::Jpeg => "jpeg",
            OutputFormat::Webp => "webp",
        }
    }

    pub fn to_proto(self) -> fastfusion_proto::OutputFormat {
        match self {
            OutputFormat::Png => fastfusion_proto::OutputFormat::Png,
            OutputFormat::Jpeg => fastfusion_proto::OutputFormat::Jpeg,
            OutputFormat::Webp => fastfusion_proto::OutputFormat::Webp,
        }
    }

    pub fn from_proto(format: fastfusion_proto::OutputFormat) -> Self {
        match format {
            fastfusion_proto::OutputFormat::Png => OutputFormat::Png,
            fastfusion_proto::OutputFormat::Jpeg => OutputFormat::Jpeg,
            fastfusion_proto::OutputFormat::Webp => OutputFormat::Webp,
        }
    }
}

/// OpenAI's `background`; diffusion models here paint opaque images only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Background {
    Transparent,
    Opaque,
    Auto,
}

/// The response of every image endpoint.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
pub struct ImagesResponse {
    /// Unix seconds.
    pub created: u64,
    pub data: Vec<ImageData>,
    /// `"WIDTHxHEIGHT"` actually generated.
    pub size: String,
    pub output_format: OutputFormat,
    /// The quality asked for (a preset or OpenAI name), `"auto"` when none was.
    pub quality: String,
}

/// One generated image: exactly one of `url` and `b64_json` is set.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
pub struct ImageData {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub b64_json: Option<String>,
    /// Extension: the seed that reproduces this image.
    pub seed: u64,
}

/// One server-sent event of a streamed request (`stream: true`): OpenAI's
/// `ImageGenPartialImageEvent` / `ImageGenCompletedEvent` and their `image_edit.*` twins, which
/// the SDKs tell apart by `type`. Images are always inline (`b64_json`), as OpenAI streams them.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
pub struct ImageStreamEvent {
    #[serde(rename = "type")]
    pub kind: StreamEventType,
    pub b64_json: String,
    /// Unix seconds when the event was made.
    pub created_at: u64,
    /// `"WIDTHxHEIGHT"` being generated.
    pub size: String,
    /// The quality asked for (a preset or OpenAI name), `"auto"` when none was.
    pub quality: String,
    pub background: Background,
    pub output_format: OutputFormat,
    /// Partial images only: which preview of its image, 0-based.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partial_image_index: Option<u32>,
    /// Completed events only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<ImageUsage>,
    /// Extension: the seed that reproduces this image.
    pub seed: u64,
}

/// `ImageStreamEvent.type`. Edits and variations both stream `image_edit.*` (OpenAI streams no
/// variations; an edit of the whole picture is the nearest shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
pub enum StreamEventType {
    #[serde(rename = "image_generation.partial_image")]
    GenerationPartialImage,
    #[serde(rename = "image_generation.completed")]
    GenerationCompleted,
    #[serde(rename = "image_edit.partial_image")]
    EditPartialImage,
    #[serde(rename = "image_edit.completed")]
    EditCompleted,
}

impl StreamEventType {
    /// The name, also sent as the SSE `event:` field.
    pub fn name(self) -> &'static str {
        match self {
            StreamEventType::GenerationPartialImage => "image_generation.partial_image",
            StreamEventType::GenerationCompleted => "image_generation.completed",
            StreamEventType::EditPartialImage => "image_edit.partial_image",
            StreamEventType::EditCompleted => "image_edit.completed",
        }
    }
}

/// Extension: `event: fastfusion.progress`, sent while streaming when the request asks for it
/// (`stream_progress: true`), so a UI can show where its job is. OpenAI clients never see one
/// unless they ask.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
pub struct ImageProgressEvent {
    /// Always `"fastfusion.progress"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `queued` (waiting for the model), `started` (in a batch) or `denoising`.
    pub stage: ProgressStage,
    /// Queued only: jobs ahead of this one (0: next to run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<u32>,
    /// Denoising only: steps done, 1..=total.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<u32>,
    /// Started and denoising: steps the job runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<u32>,
    /// Started only: the seed in use (the request's, or the random one picked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl ImageProgressEvent {
    /// The SSE `event:` name and the `type` field.
    pub const NAME: &'static str = "fastfusion.progress";
}

/// [`ImageProgressEvent::stage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProgressStage {
    Queued,
    Started,
    Denoising,
}

/// OpenAI's token usage of a completed event. Its SDK types require the field, but diffusion
/// models are not billed by token, so every count is 0.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
pub struct ImageUsage {
    pub input_tokens: u64,
    pub input_tokens_details: InputTokensDetails,
    pub output_tokens: u64,
    pub total_tokens: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
pub struct InputTokensDetails {
    pub image_tokens: u64,
    pub text_tokens: u64,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
pub struct ModelList {
    /// Always `"list"`.
    pub object: String,
    pub data: Vec<Model>,
}

/// One served model: OpenAI's `id`, `object`, `created`, `owned_by`, then what the model's
/// workers report (extensions, for UIs such as the playground: which endpoints, sizes, steps,
/// schedulers, presets and LoRAs it takes). Limits are the ones the gateway enforces.
#[derive(Debug, Clone, Default, Deserialize, Serialize, utoipa::ToSchema)]
pub struct Model {
    pub id: String,
    /// Always `"model"`.
    pub object: String,
    /// Unix seconds; the gateway's start time (workers report no creation date).
    pub created: u64,
    pub owned_by: String,
    /// Whether a worker of this model has loaded it (until then sizes are unknown: 0).
    pub loaded: bool,
    /// The endpoints switched on: `generations`, `edits`, `variations`.
    pub endpoints: Vec<String>,
    /// What `size: "auto"` gives for generations, `"WIDTHxHEIGHT"`; empty until loaded.
    pub native_size: String,
    /// Width and height must be multiples of this.
    pub size_multiple: u32,
    /// Largest width × height.
    pub max_pixels: u64,
    /// Most images per request (`n`).
    pub max_n: u32,
    /// Most denoising steps per request.
    pub max_steps: u32,
    /// FLUX: the most T5 tokens `max_sequence_length` may ask for; absent for models without T5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sequence_length: Option<u32>,
    /// Names accepted in `scheduler`.
    pub schedulers: Vec<String>,
    /// The scheduler used when a request names none (the model's own).
    pub default_scheduler: String,
    /// Steps and guidance when a request gives neither nor a `quality` preset.
    pub default_num_inference_steps: u32,
    pub default_guidance_scale: f32,
    /// `strength` of edits and variations that give none.
    pub default_strength: f32,
    /// The model's `generation_presets`, selected by `quality`.
    pub presets: Vec<ModelPreset>,
    /// LoRA adapter names usable in `lora_settings`.
    pub loras: Vec<String>,
}

/// A `generation_presets` entry.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
pub struct ModelPreset {
    pub name: String,
    pub guidance_scale: f32,
    pub num_inference_steps: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full_common() -> CommonFields {
        CommonFields {
            prompt: Some(String::new()),
            model: Some(String::new()),
            n: Some(1),
            size: Some(String::new()),
            quality: Some(String::new()),
            user: Some(String::new()),
            response_format: Some(ResponseFormat::Url),
            output_format: Some(OutputFormat::Png),
            output_compression: Some(1),
            background: Some(Background::Auto),
            stream: Some(false),
            partial_images: Some(0),
            stream_progress: Some(false),
            safety_identifier: Some(String::new()),
            complexity: Some(serde_json::Value::Null),
            seed: Some(1),
            negative_prompt: Some(String::new()),
            guidance_scale: Some(1.0),
            num_inference_steps: Some(1),
            scheduler: Some(String::new()),
            lora_settings: Some(Vec::new()),
            max_sequence_length: Some(1),
        }
    }

    /// The top-level keys `value` serializes to, sorted.
    fn keys(value: impl Serialize) -> Vec<String> {
        let value = serde_json::to_value(value).expect("serializes");
        let mut keys: Vec<String> = value
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        keys.sort_unstable();
        keys
    }

    fn sorted(lists: &[&[&str]]) -> Vec<String> {
        let mut fields: Vec<String> = lists.concat().iter().map(|f| f.to_string()).collect();
        fields.sort_unstable();
        fields
    }

    #[test]
    fn fields_lists_every_request_field() {
        let full = ImageGenerationRequest {
            common: full_common(),
            style: Some(String::new()),
            moderation: Some(String::new()),
        };
        assert_eq!(
            keys(full),
            sorted(&[CommonFields::FIELDS, ImageGenerationRequest::OWN_FIELDS])
        );
    }

    #[test]
    fn edit_fields_lists_every_request_field() {
        let full = ImageEditRequest {
            common: full_common(),
            input_fidelity: Some(String::new()),
            strength: Some(0.5),
            images: Some(Vec::new()),
            mask: Some(ImageReference::default()),
            markup: Some(serde_json::Value::Null),
        };
        assert_eq!(
            keys(full),
            sorted(&[CommonFields::FIELDS, ImageEditRequest::OWN_FIELDS])
        );
    }

    #[test]
    fn wire_names_match_openai() {
        let request: ImageGenerationRequest = serde_json::from_str(
            r#"{"response_format":"b64_json","output_format":"webp","background":"opaque",
                "lora_settings":[{"name":"a"}]}"#,
        )
        .expect("parses");
        let request = request.common;
        assert_eq!(request.response_format, Some(ResponseFormat::B64Json));
        assert_eq!(request.output_format, Some(OutputFormat::Webp));
        assert_eq!(request.background, Some(Background::Opaque));
        let loras = request.lora_settings.unwrap_or_default();
        assert_eq!(loras.len(), 1);
        assert_eq!(loras[0].weight, 1.0);
    }

    #[test]
    fn extensions_round_trip() {
        for format in [OutputFormat::Png, OutputFormat::Jpeg, OutputFormat::Webp] {
            assert_eq!(
                OutputFormat::from_extension(format.extension()),
                Some(format)
            );
            assert_eq!(OutputFormat::from_proto(format.to_proto()), format);
        }
        assert_eq!(OutputFormat::from_extension("jpeg"), None);
    }
}
