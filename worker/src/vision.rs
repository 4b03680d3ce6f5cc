//! The vision-model prompt for variations: ask an OpenAI-compatible chat model to describe an
//! image as a text-to-image prompt.
//!
//! A variation request without a `prompt` still needs text for the diffusion model to follow.
//! When `variations_config.vision_model` is set, the service sends the input image to that model
//! and uses its reply as the prompt; on any failure it logs a warning and uses
//! [`DEFAULT_VARIATION_PROMPT`] instead, so a broken vision model never fails a request.
//!
//! Data flow:
//!
//! ```text
//! VariationsConfig ──VisionSettings::from_config──▶ VisionSettings (model, endpoint URL, key, timeout)
//! PNG bytes ──describe_image──▶ POST <host>/v1/chat/completions ──▶ choices[0].message.content ──▶ prompt
//! ```
//!
//! The wire format is the chat completions API as OpenAI, vLLM and Ollama (`/v1`) serve it: a
//! system message, then a user message whose content is an instruction text part and an
//! `image_url` part holding the image as a `data:image/png;base64,…` URL. Every failure
//! (bad host, connection, timeout, non-2xx status, unreadable reply, empty reply) is a
//! [`VisionError`]; nothing here panics on what the network sends.

use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::json;

use crate::config::VariationsConfig;

/// The prompt used when a variation has no prompt and the vision model is off or failed.
///
/// The original used `Create variations of the image at your best guess!`, an instruction that
/// a CLIP text encoder cannot follow: it only embeds descriptions. Image-to-image keeps the input's
/// layout and colours (how much depends on `strength`), so the prompt only needs to pull towards
/// a clean, well-rendered picture without naming any subject that might contradict the image.
pub const DEFAULT_VARIATION_PROMPT: &str =
    "a detailed, high quality image, sharp focus, natural colors, balanced composition";

/// How long one vision call may take, connection included, unless the settings say otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The host used when `vision_model_host` is empty: the seed's default.
const DEFAULT_HOST: &str = "https://api.openai.com";

/// The path every OpenAI-compatible server serves chat completions under, below its base URL.
const CHAT_COMPLETIONS_PATH: &str = "/v1/chat/completions";

/// The longest reply body read; a description is a few hundred bytes, so more is a broken server.
const MAX_REPLY_BYTES: usize = 1024 * 1024;

/// Most characters of an error reply quoted in a [`VisionError::Status`] message.
const MAX_QUOTED_ERROR_CHARS: usize = 300;

/// Low temperature: we want the most likely description, not a creative one.
const TEMPERATURE: f64 = 0.2;

/// Enough for a ~50-word prompt; CLIP reads only 77 tokens of it anyway.
const MAX_TOKENS: u32 = 200;

const SYSTEM_MESSAGE: &str = "You write prompts for text-to-image diffusion models such as \
Stable Diffusion. Reply with the prompt only: no preamble, no quotes, no explanation.";

const INSTRUCTION: &str = "Write a prompt that would make a text-to-image model recreate this \
image. Name the subject, the setting, the composition, the style or medium, the lighting and the \
main colours, as one line of comma-separated phrases of at most 50 words.";

/// Where and how to call the vision model; built once from the config.
#[derive(Clone, PartialEq, Eq)]
pub struct VisionSettings {
    /// The model name sent in the request (`gpt-4o`, `llava-hf/llava-1.5-7b-hf`, …).
    pub model: String,
    /// The full chat completions URL, `<base>/v1/chat/completions`.
    pub endpoint_url: String,
    /// Sent as `Authorization: Bearer <key>`; `None` sends no header (local servers need none).
    pub api_key: Option<String>,
    /// Limit on the whole call: connecting, sending the image and reading the reply.
    pub timeout: Duration,
}

/// Hand-written so that logging the settings never prints the key.
impl fmt::Debug for VisionSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VisionSettings")
            .field("model", &self.model)
            .field("endpoint_url", &self.endpoint_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl VisionSettings {
    /// Settings from `variations_config`, reading the key's variable from the process
    /// environment; `None` when `vision_model` is empty (no vision model configured).
    pub fn from_config(config: &VariationsConfig) -> Option<Self> {
        Self::from_config_with_env(config, |name| std::env::var(name).ok())
    }

    /// [`Self::from_config`] with the environment given as a lookup function, for callers that
    /// hold their own environment (and tests, which cannot change the process's safely).
    ///
    /// The key is the value of the variable named by `vision_model_api_key_variable` when that
    /// is set and not empty, else `vision_model_api_key` when not empty, else none.
    pub fn from_config_with_env(
        config: &VariationsConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Option<Self> {
        let model = config.vision_model.trim();
        if model.is_empty() {
            return None;
        }
        let variable = config.vision_model_api_key_variable.trim();
        let from_env = if variable.is_empty() {
            None
        } else {
            env(variable).filter(|key| !key.trim().is_empty())
        };
        let inline = Some(config.vision_model_api_key.clone()).filter(|key| !key.trim().is_empty());
        let api_key = from_env.or(inline).map(|key| key.trim().to_owned());
        let endpoint_url = chat_completions_url(&config.vision_model_host);
        // The seed's defaults name gpt-4o on OpenAI; without a key every call would be a 401, so
        // the feature stays off rather than costing each variation a round trip.
        if api_key.is_none() && endpoint_url.starts_with(DEFAULT_HOST) {
            tracing::info!(
                model,
                "no API key for the OpenAI vision model: variations without a prompt use the default prompt"
            );
            return None;
        }
        Some(Self {
            model: model.to_owned(),
            endpoint_url,
            api_key,
            timeout: DEFAULT_TIMEOUT,
        })
    }
}

/// `<base>/v1/chat/completions` for a configured host, with `/v1` exactly once.
///
/// Accepts the bare origin (`https://api.openai.com`), the API base (`…/v1`, as the seed README
/// and Ollama document it), the full endpoint, and any of these with trailing slashes; a host
/// under a path prefix (`http://proxy/openai/v1`) keeps its prefix. Empty means OpenAI.
pub fn chat_completions_url(host: &str) -> String {
    let mut base = host.trim().trim_end_matches('/');
    if base.is_empty() {
        base = DEFAULT_HOST;
    }
    for suffix in ["/chat/completions", "/v1"] {
        if let Some(stripped) = base.strip_suffix(suffix) {
            base = stripped.trim_end_matches('/');
        }
    }
    format!("{base}{CHAT_COMPLETIONS_PATH}")
}

/// Why the vision model gave no prompt; the service logs it and falls back.
#[derive(Debug, thiserror::Error)]
pub enum VisionError {
    /// `vision_model_host` does not make an http(s) URL.
    #[error("vision_model_host gives '{url}', which is not an http(s) URL: {message}")]
    InvalidHost { url: String, message: String },
    /// No connection to the server (refused, DNS, TLS).
    #[error("cannot connect to the vision model at {url}: {message}")]
    Connect { url: String, message: String },
    /// The call did not finish within the timeout.
    #[error("the vision model at {url} did not answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    /// The server answered with a non-2xx status; `message` is its error text.
    #[error("the vision model answered {status}: {message}")]
    Status { status: u16, message: String },
    /// The reply is not a chat completion we can read.
    #[error("the vision model's reply is unreadable: {0}")]
    InvalidReply(String),
    /// The reply holds no text.
    #[error("the vision model's reply is empty")]
    EmptyReply,
}

impl VisionError {
    /// Stable name of the variant, for logs and metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            VisionError::InvalidHost { .. } => "invalid_host",
            VisionError::Connect { .. } => "connect",
            VisionError::Timeout { .. } => "timeout",
            VisionError::Status { .. } => "status",
            VisionError::InvalidReply(_) => "invalid_reply",
            VisionError::EmptyReply => "empty_reply",
        }
    }
}

/// Asks the vision model for a prompt that would recreate `image_png` (PNG bytes).
///
/// One POST, no retries: the caller has a fallback and a user is waiting. Redirects are not
/// followed (a POST API that redirects is misconfigured, and following would drop the body).
pub async fn describe_image(
    settings: &VisionSettings,
    image_png: &[u8],
) -> Result<String, VisionError> {
    let url =
        reqwest::Url::parse(&settings.endpoint_url).map_err(|err| invalid_host(settings, err))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid_host(settings, "the scheme must be http or https"));
    }
    let client = build_client(settings, &url)?;
    let body = request_body(&settings.model, image_png);
    let mut request = client.post(url).json(&body);
    if let Some(key) = &settings.api_key {
        request = request.bearer_auth(key);
    }
    let response = request
        .send()
        .await
        .map_err(|err| transport_error(settings, err))?;
    let status = response.status();
    let bytes = read_limited(settings, response).await?;
    if !status.is_success() {
        return Err(VisionError::Status {
            status: status.as_u16(),
            message: error_message(status, &bytes),
        });
    }
    parse_reply(&bytes)
}

/// The HTTP client for one call: the timeout, no redirects, and no proxy for loopback hosts
/// (a local vLLM or Ollama must not be sent to a corporate proxy from `HTTPS_PROXY`).
fn build_client(
    settings: &VisionSettings,
    url: &reqwest::Url,
) -> Result<reqwest::Client, VisionError> {
    let mut builder = reqwest::Client::builder()
        .timeout(settings.timeout)
        .redirect(reqwest::redirect::Policy::none());
    if is_loopback(url) {
        builder = builder.no_proxy();
    }
    builder.build().map_err(|err| VisionError::Connect {
        url: settings.endpoint_url.clone(),
        message: format!("cannot set up the HTTP client: {err}"),
    })
}

fn is_loopback(url: &reqwest::Url) -> bool {
    // `host_str` writes IPv6 addresses in brackets, as URLs do.
    let host = url.host_str().unwrap_or_default();
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The chat completions request: system message, then instruction and image in one user message.
fn request_body(model: &str, image_png: &[u8]) -> serde_json::Value {
    let data_url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(image_png)
    );
    json!({
        "model": model,
        "messages": [
            { "role": "system", "content": SYSTEM_MESSAGE },
            {
                "role": "user",
                "content": [
                    { "type": "text", "text": INSTRUCTION },
                    { "type": "image_url", "image_url": { "url": data_url } }
                ]
            }
        ],
        "temperature": TEMPERATURE,
        "max_tokens": MAX_TOKENS,
    })
}

fn invalid_host(settings: &VisionSettings, message: impl fmt::Display) -> VisionError {
    VisionError::InvalidHost {
        url: settings.endpoint_url.clone(),
        message: message.to_string(),
    }
}

/// Sorts a reqwest failure into timeout, connection or (anything else on the wire) unreadable.
fn transport_error(settings: &VisionSettings, err: reqwest::Error) -> VisionError {
    let url = settings.endpoint_url.clone();
    if err.is_timeout() {
        VisionError::Timeout {
            url,
            timeout: settings.timeout,
        }
    } else if err.is_connect() {
        VisionError::Connect {
            url,
            message: error_chain(&err),
        }
    } else {
        VisionError::InvalidReply(error_chain(&err))
    }
}

/// reqwest's own message is generic ("error sending request"); the cause says what happened.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// Reads the body, refusing more than [`MAX_REPLY_BYTES`] so a broken server cannot fill memory.
async fn read_limited(
    settings: &VisionSettings,
    mut response: reqwest::Response,
) -> Result<Vec<u8>, VisionError> {
    let mut bytes = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|err| transport_error(settings, err))?
    {
        if bytes.len() + chunk.len() > MAX_REPLY_BYTES {
            return Err(VisionError::InvalidReply(format!(
                "the reply is larger than {MAX_REPLY_BYTES} bytes"
            )));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// The error text of a non-2xx reply: OpenAI's `{"error": {"message": …}}`, Ollama's
/// `{"error": "…"}`, a top-level `message` (vLLM), else the start of the body, else the reason.
fn error_message(status: reqwest::StatusCode, body: &[u8]) -> String {
    let from_json = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|value| {
            let text = value
                .pointer("/error/message")
                .or_else(|| value.get("error"))
                .or_else(|| value.get("message"))?;
            text.as_str().map(str::to_owned)
        });
    let text = from_json.unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    let text = text.trim();
    if text.is_empty() {
        return status
            .canonical_reason()
            .unwrap_or("no error message")
            .to_owned();
    }
    let mut quoted: String = text.chars().take(MAX_QUOTED_ERROR_CHARS).collect();
    if quoted.len() < text.len() {
        quoted.push('…');
    }
    quoted
}

/// The parts of a chat completion we read.
#[derive(Deserialize)]
struct Completion {
    choices: Vec<Choice>,
}

#[derive(Deserialize)]
struct Choice {
    message: Message,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    content: Option<Content>,
}

/// `content` is a string from most servers, an array of typed parts from some.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    text: Option<String>,
}

/// `choices[0].message.content` as one cleaned-up prompt line.
fn parse_reply(body: &[u8]) -> Result<String, VisionError> {
    let completion: Completion = serde_json::from_slice(body)
        .map_err(|err| VisionError::InvalidReply(format!("not a chat completion ({err})")))?;
    let choice = completion
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| VisionError::InvalidReply("no choices".to_owned()))?;
    let text = match choice.message.content {
        None => String::new(),
        Some(Content::Text(text)) => text,
        Some(Content::Parts(parts)) => parts
            .into_iter()
            .filter(|part| part.kind.as_deref().is_none_or(|kind| kind == "text"))
            .filter_map(|part| part.text)
            .collect::<Vec<_>>()
            .join(" "),
    };
    let prompt = clean_prompt(&text);
    if prompt.is_empty() {
        return Err(VisionError::EmptyReply);
    }
    Ok(prompt)
}

/// Removes what chat models add despite the instruction: a `Prompt:` label, wrapping quotes or
/// backticks, line breaks (a prompt is one line; the tokenizer would read them as spaces anyway).
fn clean_prompt(text: &str) -> String {
    let mut prompt = text.trim();
    if let Some(label) = prompt.get(..7) {
        if label.eq_ignore_ascii_case("prompt:") {
            prompt = prompt[7..].trim_start();
        }
    }
    for (open, close) in [('"', '"'), ('“', '”'), ('\'', '\''), ('`', '`')] {
        if prompt.len() >= 2 && prompt.starts_with(open) && prompt.ends_with(close) {
            prompt = prompt[open.len_utf8()..prompt.len() - close.len_utf8()].trim();
        }
    }
    prompt.split_whitespace().collect::<Vec<_>>().join(" ")
}
