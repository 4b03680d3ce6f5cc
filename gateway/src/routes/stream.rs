//! `stream: true`: one `Generate` call answered as server-sent events, the way OpenAI streams
//! images.
//!
//! ```text
//! worker event      SSE sent (event: NAME, data: JSON)
//! Queued/Started    nothing (logged); fastfusion.progress with `stream_progress`
//! Progress          nothing (logged); fastfusion.progress with `stream_progress`
//! PartialImage      image_generation.partial_image | image_edit.partial_image
//! Image             image_generation.completed     | image_edit.completed   (one per image of n)
//! Done              the stream ends
//! failure           error: {"type":"error","error":{"message","type","param","code"}}, then the end
//! ```
//!
//! The response is only committed once the worker's first event arrives, so a refusal that comes
//! at once (queue full, unknown LoRA, worker loading) still gets its JSON error and status code.
//! After that, failures (the worker failing, the request timeout passing, a short count of
//! images) become an `error` event in OpenAI's error shape, which the SDKs raise as `APIError`.
//!
//! The worker's stream lives inside the response body: when the client goes away, hyper drops
//! the body and with it the gRPC call, which cancels the job on the worker. Keep-alive comments
//! flow while the request waits in a queue, so proxies do not close an idle connection.

use std::convert::Infallible;

use axum::http::{HeaderName, HeaderValue};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use fastfusion_proto::generate_event::Event;
use fastfusion_proto::{Endpoint, GenerateEvent};
use futures::stream::{self, BoxStream, StreamExt};
use serde_json::Value;
use tokio::time::Instant;

use crate::error::ApiError;
use crate::openai::{
    ImageProgressEvent, ImageStreamEvent, ImageUsage, OutputFormat, ProgressStage, StreamEventType,
};
use crate::routes::run::unix_now;
use crate::state::AppState;
use crate::validation::ValidGeneration;
use crate::workers::EventStream;

/// SSE `event:` name of a failure.
const ERROR_EVENT: &str = "error";

/// Starts `valid` on a worker for `model` and answers with its events as they come.
pub async fn respond(
    state: &AppState,
    request_id: &str,
    model: &str,
    valid: ValidGeneration,
) -> Result<Response, ApiError> {
    let timeout = state.http.request_timeout;
    let deadline = Instant::now() + timeout;
    let proto = valid.to_proto(request_id);
    let (first, events) = tokio::time::timeout_at(deadline, async {
        let mut events = state.workers.generate(model, proto).await?;
        let first = events.next().await.transpose()?;
        Ok::<_, ApiError>((first, events))
    })
    .await
    .map_err(|_| ApiError::Timeout(timeout.as_secs()))??;
    let events: EventStream = stream::iter(first.map(Ok)).chain(events).boxed();
    let relay = Relay {
        events,
        deadline,
        timeout_secs: timeout.as_secs(),
        valid,
        model: model.to_string(),
        completed: 0,
        finished: false,
    };
    let mut response = Sse::new(relay.into_stream())
        .keep_alive(KeepAlive::default())
        .into_response();
    // nginx (a common ingress) buffers responses by default, which would hold back every event.
    response.headers_mut().insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    Ok(response)
}

/// Turns worker events into SSE events until the request is done, failed or out of time.
struct Relay {
    /// The worker's stream; dropped with the relay, which cancels the call.
    events: EventStream,
    /// When the request timeout passes, counted from the request's start.
    deadline: Instant,
    timeout_secs: u64,
    /// What was asked: echoed in every event, `n` checked at the end.
    valid: ValidGeneration,
    /// Final images sent so far.
    completed: u32,
    /// The model's id, for the metrics.
    model: String,
    /// Set once the last event (the end, or an error) has been produced.
    finished: bool,
}

impl Relay {
    fn into_stream(self) -> BoxStream<'static, Result<SseEvent, Infallible>> {
        stream::unfold(self, |mut relay| async move {
            let event = relay.next_event().await?;
            Some((Ok(event), relay))
        })
        .boxed()
    }

    /// The next event to send; `None` when the stream is over.
    async fn next_event(&mut self) -> Option<SseEvent> {
        while !self.finished {
            let next = tokio::time::timeout_at(self.deadline, self.events.next()).await;
            let outcome = match next {
                Err(_) => Err(ApiError::Timeout(self.timeout_secs)),
                Ok(None) => Err(ApiError::Internal(
                    "worker stream ended before Done".to_string(),
                )),
                Ok(Some(Err(error))) => Err(error),
                Ok(Some(Ok(event))) => self.translate(event),
            };
            match outcome {
                Ok(Some(event)) => return Some(event),
                Ok(None) => {}
                Err(error) => {
                    self.finished = true;
                    // Stop the worker now rather than when the client hangs up.
                    self.events = stream::empty().boxed();
                    return Some(error_event(error).await);
                }
            }
        }
        None
    }

    /// One worker event → the SSE event to send, if any.
    fn translate(&mut self, event: GenerateEvent) -> Result<Option<SseEvent>, ApiError> {
        match event.event {
            Some(Event::Queued(queued)) => {
                tracing::debug!(position = queued.position, "queued");
                self.progress(ImageProgressEvent {
                    position: Some(queued.position),
                    ..progress_event(ProgressStage::Queued)
                })
            }
            Some(Event::Started(started)) => {
                tracing::debug!(
                    seed = started.seed,
                    steps = started.num_inference_steps,
                    batch = started.batch_size,
                    "started"
                );
                self.progress(ImageProgressEvent {
                    total: Some(started.num_inference_steps),
                    seed: Some(started.seed),
                    ..progress_event(ProgressStage::Started)
                })
            }
            Some(Event::Progress(progress)) => {
                tracing::trace!(step = progress.step, total = progress.total, "progress");
                self.progress(ImageProgressEvent {
                    step: Some(progress.step),
                    total: Some(progress.total),
                    ..progress_event(ProgressStage::Denoising)
                })
            }
            Some(Event::PartialImage(image)) => {
                let (kind, index) = (self.kind(true), image.partial_index);
                self.image_event(kind, image, Some(index)).map(Some)
            }
            Some(Event::Image(image)) => {
                self.completed += 1;
                let kind = self.kind(false);
                self.image_event(kind, image, None).map(Some)
            }
            Some(Event::Done(done)) => {
                if self.completed != self.valid.n {
                    return Err(ApiError::Internal(format!(
                        "worker returned {} of {} images",
                        self.completed, self.valid.n
                    )));
                }
                crate::metrics::generation_done(
                    &self.model,
                    self.completed as usize,
                    done.timings.as_ref(),
                );
                if let Some(t) = done.timings {
                    tracing::info!(
                        queue_ms = t.queue_ms,
                        total_ms = t.total_ms,
                        images = self.completed,
                        "generated (streamed)"
                    );
                }
                self.finished = true;
                Ok(None)
            }
            None => Ok(None),
        }
    }

    /// `event` when the request asked for progress events, else nothing.
    fn progress(&self, event: ImageProgressEvent) -> Result<Option<SseEvent>, ApiError> {
        if !self.valid.stream_progress {
            return Ok(None);
        }
        SseEvent::default()
            .event(ImageProgressEvent::NAME)
            .json_data(&event)
            .map(Some)
            .map_err(|error| ApiError::Internal(format!("cannot encode a stream event: {error}")))
    }

    fn kind(&self, partial: bool) -> StreamEventType {
        match (self.valid.endpoint, partial) {
            (Endpoint::Edits | Endpoint::Variations, true) => StreamEventType::EditPartialImage,
            (Endpoint::Edits | Endpoint::Variations, false) => StreamEventType::EditCompleted,
            (Endpoint::Generations | Endpoint::Unspecified, true) => {
                StreamEventType::GenerationPartialImage
            }
            (Endpoint::Generations | Endpoint::Unspecified, false) => {
                StreamEventType::GenerationCompleted
            }
        }
    }

    fn image_event(
        &self,
        kind: StreamEventType,
        image: fastfusion_proto::Image,
        partial_image_index: Option<u32>,
    ) -> Result<SseEvent, ApiError> {
        let format = fastfusion_proto::OutputFormat::try_from(image.format)
            .map(OutputFormat::from_proto)
            .map_err(|_| {
                ApiError::Internal(format!("worker sent unknown image format {}", image.format))
            })?;
        let payload = ImageStreamEvent {
            kind,
            b64_json: base64::engine::general_purpose::STANDARD.encode(&image.data),
            created_at: unix_now(),
            size: self.valid.size(),
            quality: self.valid.quality.clone(),
            background: self.valid.background,
            output_format: format,
            partial_image_index,
            usage: partial_image_index.is_none().then(ImageUsage::default),
            seed: image.seed,
        };
        SseEvent::default()
            .event(kind.name())
            .json_data(&payload)
            .map_err(|error| ApiError::Internal(format!("cannot encode a stream event: {error}")))
    }
}

/// A progress event at `stage` with no details yet.
fn progress_event(stage: ProgressStage) -> ImageProgressEvent {
    ImageProgressEvent {
        kind: ImageProgressEvent::NAME.to_string(),
        stage,
        position: None,
        step: None,
        total: None,
        seed: None,
    }
}

/// `error` with the body the same failure gets as a JSON response, plus `"type": "error"`, so
/// the message, type, param and code are converted in one place ([`ApiError`]'s `IntoResponse`).
async fn error_event(error: ApiError) -> SseEvent {
    let kind = error.kind();
    let response = error.into_response();
    // A small body of our own making; a failure to read it leaves the generic message below.
    let body = axum::body::to_bytes(response.into_body(), 64 * 1024)
        .await
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok());
    let mut data = body.unwrap_or_else(|| {
        serde_json::json!({"error": {
            "message": "The server had an error while processing your request.",
            "type": "server_error", "param": null, "code": "internal_error"}})
    });
    if let Some(object) = data.as_object_mut() {
        object.insert("type".to_string(), Value::String(ERROR_EVENT.to_string()));
    }
    tracing::warn!(error = kind, "stream ended with an error event");
    SseEvent::default()
        .event(ERROR_EVENT)
        .data(data.to_string())
}
