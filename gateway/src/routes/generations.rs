//! `POST /v1/images/generations`: OpenAI's text-to-image endpoint.
//!
//! The body is parsed ([`ApiJson`]), the model resolved, the request validated against that model's
//! Info into a `ValidGeneration`, and sent as one streaming `Generate` call. The stream's `Image`
//! events are collected (queued/progress events are logged) under the request timeout; dropping
//! the stream on timeout or client disconnect cancels the call on the worker. Each image is then
//! stored (`url`) or base64-inlined (`b64_json`).

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, Uri};
use axum::Json;
use base64::Engine;
use bytes::Bytes;
use fastfusion_proto::generate_event::Event;
use futures::StreamExt;

use crate::app::AppState;
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::openai::{
    ImageData, ImageGenerationRequest, ImagesResponse, OutputFormat, ResponseFormat,
};
use crate::public_url::public_base_url;
use crate::validation::validate_generation;
use crate::workers::EventStream;

pub async fn create_image(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    ApiJson(body): ApiJson<ImageGenerationRequest>,
) -> Result<Json<ImagesResponse>, ApiError> {
    let request_id = headers
        .get(crate::app::REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let info = state.workers.info(body.model.as_deref()).await?;
    let valid = validate_generation(body, &info)?;
    let timeout = state.http.request_timeout;
    let images = tokio::time::timeout(timeout, async {
        let stream = state
            .workers
            .generate(&info.model_id, valid.to_proto(&request_id))
            .await?;
        collect_images(stream, valid.n).await
    })
    .await
    .map_err(|_| ApiError::Timeout(timeout.as_secs()))??;

    let base_url = public_base_url(state.http.base_url.as_deref(), &headers, &uri);
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
                    url: Some(format!("{base_url}/v1/images/data/{id}")),
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
            // Previews are only useful when streaming, which this endpoint does not do yet.
            Some(Event::PartialImage(_)) | None => {}
            Some(Event::Image(image)) => images.push(image),
            Some(Event::Done(done)) => {
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

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}
