//! What the image endpoints share once a request is valid: run it as one streaming `Generate`
//! call and answer in OpenAI's shape. Also the pre-body endpoint check and the image inspection
//! that edits and variations share.
//!
//! Without `stream`, the stream's `Image` events are collected (queued/progress events are
//! logged) under the request timeout; dropping the stream on timeout or client disconnect (hyper
//! drops the handler) cancels the call on the worker. Each image is then stored (`url`) or
//! base64-inlined (`b64_json`). With `stream: true` the events are relayed as server-sent events
//! instead ([`crate::routes::stream`]).

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use bytes::Bytes;
use fastfusion_proto::generate_event::Event;
use fastfusion_proto::{Endpoint, InfoResponse};
use futures::StreamExt;

use crate::error::ApiError;
use crate::form::ImageForm;
use crate::openai::{ImageData, ImageEditRequest, ImagesResponse, OutputFormat, ResponseFormat};
use crate::public_url::public_base_url;
use crate::routes::stream;
use crate::state::AppState;
use crate::uploads::{inspect, InputImage, Upload};
use crate::validation::{endpoint_disabled, ValidGeneration};
use crate::workers::EventStream;

/// The request id the middleware set (or the client sent).
pub fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(crate::telemetry::REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// Refuses `endpoint` with a 404 before the body is read when every model that has reported
/// has it switched off, so a disabled edits endpoint does not first accept megabytes of upload.
/// Models not loaded yet cannot tell; the request then goes on and is decided after parsing.
pub async fn ensure_endpoint_served(state: &AppState, endpoint: Endpoint) -> Result<(), ApiError> {
    let models = state.workers.models();
    let mut disabled = Vec::new();
    for model in &models {
        match state.workers.info(Some(model)).await {
            Ok(info) if info.endpoints.contains(&(endpoint as i32)) => return Ok(()),
            Ok(info) => disabled.push(info.model_id.clone()),
            Err(_) => return Ok(()),
        }
    }
    if disabled.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = disabled.iter().map(String::as_str).collect();
    Err(endpoint_disabled(&names, endpoint))
}

/// Validates an image endpoint's request once its uploads are inspected.
pub type ValidateImages = fn(
    ImageEditRequest,
    Vec<InputImage>,
    Option<InputImage>,
    &InfoResponse,
) -> Result<ValidGeneration, ApiError>;

/// What edits and variations share: the endpoint switch before the body is read, the form
/// (multipart or JSON), the model, the uploads inspected off the runtime, `validate`, the run.
pub async fn image_task(
    state: &AppState,
    headers: &HeaderMap,
    uri: &Uri,
    request: Request,
    endpoint: Endpoint,
    validate: ValidateImages,
) -> Result<Response, ApiError> {
    ensure_endpoint_served(state, endpoint).await?;
    let ImageForm {
        request: fields,
        images,
        mask,
    } = ImageForm::from_request(request, state).await?;
    let info = state.workers.info(fields.common.model.as_deref()).await?;
    let (images, mask) = inspect_uploads(images, mask, state.http.max_input_pixels).await?;
    let valid = validate(fields, images, mask, &info)?;
    generate(state, headers, uri, &info, valid).await
}

/// Checks every upload ([`inspect`]) off the async runtime, since it decodes them.
pub async fn inspect_uploads(
    images: Vec<Upload>,
    mask: Option<Upload>,
    max_pixels: u64,
) -> Result<(Vec<InputImage>, Option<InputImage>), ApiError> {
    tokio::task::spawn_blocking(move || {
        let images = images
            .into_iter()
            .map(|upload| inspect(upload, max_pixels))
            .collect::<Result<Vec<_>, _>>()?;
        let mask = mask.map(|upload| inspect(upload, max_pixels)).transpose()?;
        Ok((images, mask))
    })
    .await
    .map_err(|error| ApiError::Internal(format!("image inspection task failed: {error}")))?
}

/// Runs `valid` on a worker serving `info`'s model: as server-sent events when it asks to be
/// streamed, else as one JSON body.
pub async fn generate(
    state: &AppState,
    headers: &HeaderMap,
    uri: &Uri,
    info: &InfoResponse,
    valid: ValidGeneration,
) -> Result<Response, ApiError> {
    if valid.stream {
        return stream::respond(state, &request_id(headers), &info.model_id, valid).await;
    }
    generate_json(state, headers, uri, info, valid)
        .await
        .map(IntoResponse::into_response)
}

/// Runs `valid` to the end and answers with every image at once.
async fn generate_json(
    state: &AppState,
    headers: &HeaderMap,
    uri: &Uri,
    info: &InfoResponse,
    valid: ValidGeneration,
) -> Result<Json<ImagesResponse>, ApiError> {
    let timeout = state.http.request_timeout;
    let proto = valid.to_proto(&request_id(headers));
    let images = tokio::time::timeout(timeout, async {
        let stream = state.workers.generate(&info.model_id, proto).await?;
        collect_images(stream, valid.n, &info.model_id).await
    })
    .await
    .map_err(|_| ApiError::Timeout(timeout.as_secs()))??;

    let base_url = public_base_url(state.http.base_url.as_deref(), headers, uri);
    let mut data = Vec::with_capacity(images.len());
    for image in images {
        let format = fastfusion_proto::OutputFormat::try_from(image.format)
            .map(OutputFormat::from_proto)
            .map_err(|_| {
                ApiError::Internal(format!("worker sent unknown image format {}", image.format))
            })?;
        let item = match valid.response_format {
            ResponseFormat::Url => {
                let id = state.images.put(Bytes::from(image.data), format).await?;
                ImageData {
                    url: Some(state.urls.image_url(&base_url, &id)),
                    b64_json: None,
                    seed: image.seed,
                }
            }
            ResponseFormat::B64Json => ImageData {
                url: None,
                b64_json: Some(base64::engine::general_purpose::STANDARD.encode(&image.data)),
                seed: image.seed,
            },
        };
        data.push(item);
    }
    Ok(Json(ImagesResponse {
        created: unix_now(),
        data,
        size: valid.size(),
        output_format: valid.output_format,
        quality: valid.quality,
    }))
}

/// Reads a `Generate` stream to its end and returns its `n` images in index order.
async fn collect_images(
    mut stream: EventStream,
    n: u32,
    model: &str,
) -> Result<Vec<fastfusion_proto::Image>, ApiError> {
    let mut images = Vec::with_capacity(n as usize);
    while let Some(event) = stream.next().await {
        match event?.event {
            Some(Event::Queued(queued)) => tracing::debug!(position = queued.position, "queued"),
            Some(Event::Started(started)) => tracing::debug!(
                seed = started.seed,
                steps = started.num_inference_steps,
                batch = started.batch_size,
                "started"
            ),
            Some(Event::Progress(progress)) => {
                tracing::trace!(step = progress.step, total = progress.total, "progress")
            }
            // Never asked for without `stream` (see `ValidGeneration::partial_images`).
            Some(Event::PartialImage(_)) | None => {}
            Some(Event::Image(image)) => images.push(image),
            Some(Event::Done(done)) => {
                crate::metrics::generation_done(model, images.len(), done.timings.as_ref());
                if let Some(t) = done.timings {
                    tracing::info!(
                        queue_ms = t.queue_ms,
                        total_ms = t.total_ms,
                        images = images.len(),
                        "generated"
                    );
                }
                break;
            }
        }
    }
    if images.len() != n as usize {
        return Err(ApiError::Internal(format!(
            "worker returned {} of {n} images",
            images.len()
        )));
    }
    images.sort_by_key(|image| image.index);
    Ok(images)
}

/// Unix seconds now, as OpenAI's `created` fields count.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}
