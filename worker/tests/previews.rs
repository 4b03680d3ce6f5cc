//! The real tiny model behind the gRPC service: `partial_images` previews stream between the
//! progress events, before the images, as real decodes in the output format; requests that
//! arrive together share a batch (`Started.batch_size`) and still get the images they get alone;
//! a step count the model's schedule cannot place is refused before queueing.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fastfusion_proto::generate_event::Event;
use fastfusion_proto::worker_client::WorkerClient;
use fastfusion_proto::{GenerateEvent, GenerateRequest, Image, OutputFormat, Task};
use fastfusion_worker::config::ModelConfig;
use fastfusion_worker::service::{self, WorkerService};
use fastfusion_worker::startup;
use image::RgbImage;
use tonic::transport::Channel;
use tonic::Streaming;

/// A worker serving the tiny SD 1.5 fixture with `max_batch` and `window`.
async fn start(max_batch: usize, window: Duration) -> WorkerClient<Channel> {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/tiny-sd15");
    let mut config = ModelConfig::for_model(&model.to_string_lossy());
    config.pipeline.max_batch = max_batch;
    config.pipeline.batch_window_ms = window.as_millis() as u64;
    config.pipeline.global_num_inference_steps = 3;
    config.pipeline.max_steps = 1000;
    let config = Arc::new(config);
    let engine = startup::start_engine(config.clone(), None);
    engine.ready().await.expect("the fixture model loads");
    let (listener, addr) = service::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    tokio::spawn(service::serve(
        listener,
        WorkerService::new(engine, config),
        std::future::pending(),
    ));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    WorkerClient::new(channel)
}

fn request(seed: u64, partial_images: u32) -> GenerateRequest {
    GenerateRequest {
        request_id: format!("seed-{seed}"),
        task: Task::TextToImage as i32,
        prompt: "a photo of an astronaut riding a horse on the moon".into(),
        n: 1,
        width: 32,
        height: 32,
        seed: Some(seed),
        scheduler: "euler".into(),
        partial_images,
        ..Default::default()
    }
}

async fn events(mut stream: Streaming<GenerateEvent>) -> Vec<Event> {
    let mut events = Vec::new();
    while let Some(event) = stream.message().await.expect("event") {
        events.extend(event.event);
    }
    events
}

async fn run(client: &mut WorkerClient<Channel>, req: GenerateRequest) -> Vec<Event> {
    events(client.generate(req).await.expect("admitted").into_inner()).await
}

fn decode(image: &Image) -> RgbImage {
    image::load_from_memory(&image.data)
        .expect("decodable")
        .to_rgb8()
}

fn max_diff(a: &RgbImage, b: &RgbImage) -> u8 {
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

fn images_of(events: &[Event]) -> Vec<&Image> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Image(image) => Some(image),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previews_stream_before_the_images_as_real_decodes() {
    let mut client = start(1, Duration::ZERO).await;
    let events = run(
        &mut client,
        GenerateRequest {
            n: 2,
            ..request(5, 2)
        },
    )
    .await;
    let shape: Vec<String> = events
        .iter()
        .map(|e| match e {
            Event::Queued(_) => "queued".into(),
            Event::Started(_) => "started".into(),
            Event::Progress(p) => format!("step {}", p.step),
            Event::PartialImage(p) => format!("preview {} of image {}", p.partial_index, p.index),
            Event::Image(i) => format!("image {}", i.index),
            Event::Done(_) => "done".into(),
        })
        .collect();
    assert_eq!(
        shape,
        [
            "queued",
            "started",
            "step 1",
            "preview 0 of image 0",
            "preview 0 of image 1",
            "step 2",
            "preview 1 of image 0",
            "preview 1 of image 1",
            "step 3",
            "image 0",
            "image 1",
            "done"
        ]
    );
    let finals: Vec<RgbImage> = images_of(&events).into_iter().map(decode).collect();
    for event in &events {
        if let Event::PartialImage(preview) = event {
            assert_eq!(preview.format, OutputFormat::Png as i32);
            assert_eq!((preview.width, preview.height), (32, 32));
            assert_eq!(preview.seed, 5);
            let pixels = decode(preview);
            assert_eq!(pixels.dimensions(), (32, 32));
            assert!(
                max_diff(&pixels, &finals[preview.index as usize]) > 0,
                "preview {} of image {} looks like the final image",
                preview.partial_index,
                preview.index
            );
        }
    }

    // Asking for none gives none, and the same images.
    let plain = run(
        &mut client,
        GenerateRequest {
            n: 2,
            ..request(5, 0)
        },
    )
    .await;
    assert!(!plain.iter().any(|e| matches!(e, Event::PartialImage(_))));
    let plain: Vec<RgbImage> = images_of(&plain).into_iter().map(decode).collect();
    assert_eq!(plain, finals);

    // Previews come in the request's output format.
    let jpeg = run(
        &mut client,
        GenerateRequest {
            output_format: OutputFormat::Jpeg as i32,
            ..request(5, 1)
        },
    )
    .await;
    let previews: Vec<&Image> = jpeg
        .iter()
        .filter_map(|e| match e {
            Event::PartialImage(p) => Some(p),
            _ => None,
        })
        .collect();
    assert_eq!(previews.len(), 1);
    assert_eq!(
        image::guess_format(&previews[0].data).expect("format"),
        image::ImageFormat::Jpeg
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_arriving_together_share_a_batch_and_keep_their_images() {
    let mut client = start(2, Duration::from_millis(300)).await;
    let other = GenerateRequest {
        prompt: "a red house by a lake".into(),
        guidance_scale: Some(4.0),
        ..request(11, 1)
    };
    // Two requests fill the batch of 2: it starts as soon as the second is queued.
    let first = client.generate(request(5, 0)).await.expect("first");
    let second = client.generate(other.clone()).await.expect("second");
    let first = events(first.into_inner()).await;
    let second = events(second.into_inner()).await;
    // Alone, each waits out the window for company that does not come.
    let first_alone = run(&mut client, request(5, 0)).await;
    let second_alone = run(&mut client, other).await;
    let size = |events: &[Event]| {
        events.iter().find_map(|e| match e {
            Event::Started(s) => Some(s.batch_size),
            _ => None,
        })
    };
    assert_eq!((size(&first), size(&second)), (Some(2), Some(2)));
    assert_eq!(
        (size(&first_alone), size(&second_alone)),
        (Some(1), Some(1))
    );
    for (batched, alone) in [(&first, &first_alone), (&second, &second_alone)] {
        let (batched, alone) = (decode(images_of(batched)[0]), decode(images_of(alone)[0]));
        let diff = max_diff(&batched, &alone);
        assert!(diff <= 1, "batched image is {diff}/255 from the solo one");
    }
    let previews = |events: &[Event]| {
        events
            .iter()
            .filter(|e| matches!(e, Event::PartialImage(_)))
            .count()
    };
    assert_eq!((previews(&first), previews(&second)), (0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_the_model_cannot_place_is_refused_before_queueing() {
    let mut client = start(1, Duration::ZERO).await;
    let err = client
        .generate(GenerateRequest {
            num_inference_steps: Some(1000),
            scheduler: "pndm".into(),
            ..request(5, 0)
        })
        .await
        .expect_err("refused at once, not after queueing");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert_eq!(
        err.metadata()
            .get(fastfusion_proto::PARAM_METADATA_KEY)
            .and_then(|v| v.to_str().ok()),
        Some("num_inference_steps")
    );
}
