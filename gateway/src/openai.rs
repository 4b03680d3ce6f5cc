//! The OpenAI Images API wire types, as the openai-python SDK sends and receives them.
//!
//! [`ImageGenerationRequest`] is the raw `POST /v1/images/generations` body: every field optional
//! so that `validation.rs` (not serde) decides what is missing and names it. Top-level extensions
//! (seed, negative_prompt, guidance_scale, num_inference_steps, scheduler, lora_settings) sit beside
//! OpenAI's own fields, as vLLM-Omni does. Unknown fields are ignored (the SDK gains new ones) and
//! logged at debug by [`crate::extract`]. [`ImagesResponse`] is what OpenAI returns, plus the seed
//! of each image.

use serde::{Deserialize, Serialize};

/// `POST /v1/images/generations` as received.
///
/// `moderation` is accepted for SDK compatibility and ignored: FastFusion runs no content filter.
/// `style` and `user` are accepted and not used by the diffusion models.
#[derive(Debug, Default, Clone, Deserialize, Serialize, utoipa::ToSchema)]
pub struct ImageGenerationRequest {
    pub prompt: Option<String>,
    pub model: Option<String>,
    pub n: Option<u32>,
    /// `"WIDTHxHEIGHT"` or `"auto"` (the model's native size).
    pub size: Option<String>,
    /// A `generation_presets` name, or one of OpenAI's (standard, hd, low, medium, high, auto).
    pub quality: Option<String>,
    pub style: Option<String>,
    pub user: Option<String>,
    pub response_format: Option<ResponseFormat>,
    pub output_format: Option<OutputFormat>,
    pub output_compression: Option<u32>,
    pub background: Option<Background>,
    pub moderation: Option<String>,
    /// `true`: answer with server-sent events ([`ImageStreamEvent`]) instead of one JSON body.
    pub stream: Option<bool>,
    /// Previews sent before each final image when streaming, 0..=3; ignored without `stream`.
    pub partial_images: Option<u32>,
    // Extensions.
    pub seed: Option<u64>,
    pub negative_prompt: Option<String>,
    pub guidance_scale: Option<f64>,
    pub num_inference_steps: Option<u32>,
    pub scheduler: Option<String>,
    pub lora_settings: Option<Vec<LoraSetting>>,
}

impl ImageGenerationRequest {
    /// Every field name the gateway understands; others are ignored and logged at debug.
    pub const FIELDS: &'static [&'static str] = &[
        "prompt",
        "model",
        "n",
        "size",
        "quality",
        "style",
        "user",
        "response_format",
        "output_format",
        "output_compression",
        "background",
        "moderation",
        "stream",
        "partial_images",
        "seed",
        "negative_prompt",
        "guidance_scale",
        "num_inference_steps",
        "scheduler",
        "lora_settings",
    ];
}

/// `POST /v1/images/edits` and `POST /v1/images/variations` as received, from a multipart form
/// (every text part; files travel beside it as uploads) or from the JSON body form of edits.
///
/// Variations use the same fields: there `prompt` is optional. `input_fidelity` (OpenAI's, for
/// its own models) and `user` are accepted and not used.
#[derive(Debug, Default, Clone, Deserialize, Serialize, utoipa::ToSchema)]
pub struct ImageEditRequest {
    pub prompt: Option<String>,
    pub model: Option<String>,
    pub n: Option<u32>,
    /// `"WIDTHxHEIGHT"`, or `"auto"` (the default here): the first input's size.
    pub size: Option<String>,
    pub quality: Option<String>,
    pub user: Option<String>,
    pub response_format: Option<ResponseFormat>,
    pub output_format: Option<OutputFormat>,
    pub output_compression: Option<u32>,
    pub background: Option<Background>,
    pub input_fidelity: Option<String>,
    pub stream: Option<bool>,
    pub partial_images: Option<u32>,
    // Extensions.
    pub seed: Option<u64>,
    pub negative_prompt: Option<String>,
    pub guidance_scale: Option<f64>,
    pub num_inference_steps: Option<u32>,
    pub scheduler: Option<String>,
    pub lora_settings: Option<Vec<LoraSetting>>,
    /// How much of the denoising schedule runs over the input, 0 < strength <= 1.
    pub strength: Option<f64>,
    /// JSON form only: the input images; the first is the one edited.
    pub images: Option<Vec<ImageReference>>,
    /// JSON form only: the mask for the first image.
    pub mask: Option<ImageReference>,
}

impl ImageEditRequest {
    /// Every field name the gateway understands; others are ignored and logged at debug.
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
        "input_fidelity",
        "stream",
        "partial_images",
        "seed",
        "negative_prompt",
        "guidance_scale",
        "num_inference_steps",
        "scheduler",
        "lora_settings",
        "strength",
        "images",
        "mask",
    ];
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

/// The encoding of the returned images.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    #[default]
    Png,
    Jpeg,
    Webp,
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

#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
pub struct Model {
    pub id: String,
    /// Always `"model"`.
    pub object: String,
    /// Unix seconds; the gateway's start time (workers report no creation date).
    pub created: u64,
    pub owned_by: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_lists_every_request_field() {
        let full = ImageGenerationRequest {
            prompt: Some(String::new()),
            model: Some(String::new()),
            n: Some(1),
            size: Some(String::new()),
            quality: Some(String::new()),
            style: Some(String::new()),
            user: Some(String::new()),
            response_format: Some(ResponseFormat::Url),
            output_format: Some(OutputFormat::Png),
            output_compression: Some(1),
            background: Some(Background::Auto),
            moderation: Some(String::new()),
            stream: Some(false),
            partial_images: Some(0),
            seed: Some(1),
            negative_prompt: Some(String::new()),
            guidance_scale: Some(1.0),
            num_inference_steps: Some(1),
            scheduler: Some(String::new()),
            lora_settings: Some(Vec::new()),
        };
        let value = serde_json::to_value(full).expect("serializes");
        let mut keys: Vec<&str> = value
            .as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default();
        keys.sort_unstable();
        let mut fields = ImageGenerationRequest::FIELDS.to_vec();
        fields.sort_unstable();
        assert_eq!(keys, fields);
    }

    #[test]
    fn edit_fields_lists_every_request_field() {
        let full = ImageEditRequest {
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
            input_fidelity: Some(String::new()),
            stream: Some(false),
            partial_images: Some(0),
            seed: Some(1),
            negative_prompt: Some(String::new()),
            guidance_scale: Some(1.0),
            num_inference_steps: Some(1),
            scheduler: Some(String::new()),
            lora_settings: Some(Vec::new()),
            strength: Some(0.5),
            images: Some(Vec::new()),
            mask: Some(ImageReference::default()),
        };
        let value = serde_json::to_value(full).expect("serializes");
        let mut keys: Vec<&str> = value
            .as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default();
        keys.sort_unstable();
        let mut fields = ImageEditRequest::FIELDS.to_vec();
        fields.sort_unstable();
        assert_eq!(keys, fields);
    }

    #[test]
    fn wire_names_match_openai() {
        let request: ImageGenerationRequest = serde_json::from_str(
            r#"{"response_format":"b64_json","output_format":"webp","background":"opaque",
                "lora_settings":[{"name":"a"}]}"#,
        )
        .expect("parses");
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
