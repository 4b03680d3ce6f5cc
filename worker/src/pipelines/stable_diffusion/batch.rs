//! Several requests through one denoising loop: the pipeline's side of dynamic batching (the
//! engine decides which requests run together), and the loop every single request runs too.
//!
//! Each request keeps everything that makes its images its own: its prompt's conditioning and
//! guidance scale, its generator (initial noise, and an ancestral scheduler's per-step noise, are
//! drawn from it in the same order as in a run alone), its scheduler state, its image-task inputs
//! and its observer. Only the UNet pass is shared:
//!
//! ```text
//! entries ─check, encode prompt, prepare (each)─▶ Running { conditioning, plan, latents }
//!         (all must share the timesteps, the first step and the latent size)
//! per step   UNet([rows of a | rows of b | …], t, [embeds of a | embeds of b | …])
//!            ─split─▶ a: guidance(g_a) → scheduler_a.step(rng_a) [→ blend_a] → progress_a
//!                     b: …            (a Break drops that request's rows from the next step on)
//! each       VAE decode, one image at a time
//! ```
//!
//! A request's rows are laid out as in a run alone (`[scaled×n; scaled×n]` against
//! `[uncond×n; cond×n]` with guidance, plus an inpainting UNet's extra channels), so a batch of
//! one is exactly the solo pipeline: `text_to_image`, `image_to_image` and `inpaint` are that.
//!
//! Previews ([`Progress::partial_images`]): after the steps [`preview_steps`] picks, the
//! request's current latents are VAE-decoded like the final ones. They are the scheduler's
//! `x_t` (what diffusers' step callbacks see), not a predicted `x_0`: every scheduler has them,
//! and a preview then shows honestly how far the denoising has got.

use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};
use image::{GrayImage, RgbImage};

use super::{Conditioning, Plan, Progress, StableDiffusion, Stage, TextToImage};
use crate::error::{Result, WorkerError};
use crate::rng::TorchRng;

/// Most previews one request may ask for (OpenAI's `partial_images` is 0 to 3).
pub const MAX_PARTIAL_IMAGES: usize = 3;

/// What a request starts from besides its prompt, already at the output size.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    Text,
    Image {
        image: &'a RgbImage,
        strength: f64,
    },
    /// `mask` is white where the model repaints.
    Inpaint {
        image: &'a RgbImage,
        mask: &'a GrayImage,
        strength: f64,
    },
}

/// One request of a batch.
pub struct BatchEntry<'a> {
    pub request: &'a TextToImage,
    pub input: Input<'a>,
    pub progress: &'a mut dyn Progress,
}

/// The steps (counted from 1 at the request's first step, as `Progress::on_step` counts them)
/// after which a loop of `steps` steps decodes `previews` previews: `⌊steps·i / (previews+1)⌋`
/// for i = 1..=previews, evenly spaced and never the last step, which gives the real image.
/// A loop of `steps` steps has room for `steps − 1` previews; asking for more gives that many.
pub fn preview_steps(previews: usize, steps: usize) -> Vec<usize> {
    let mut at: Vec<usize> = (1..=previews)
        .map(|i| steps * i / (previews + 1))
        .filter(|&step| step >= 1)
        .collect();
    at.dedup();
    at
}

/// A request in the loop.
struct Running {
    /// Its position in the caller's entries.
    entry: usize,
    cond: Conditioning,
    plan: Plan,
    /// (n, C, h, w) float32, updated every step.
    latents: Tensor,
    /// Steps after which a preview is decoded ([`preview_steps`]).
    previews: Vec<usize>,
    /// Preparing the initial latents (VAE-encoding an input image included).
    prepare: Duration,
    /// This request's preview decodes so far.
    decode: Duration,
}

impl StableDiffusion {
    /// Runs `entries` together: one UNet pass per step for all of them. Returns one result per
    /// entry, in order. A request that fails its checks or is cancelled (its observer breaks)
    /// fails alone; a failed shared pass fails every request still in the loop. Entries must
    /// share the schedule (scheduler kind, steps, strength) and the size; one that does not
    /// share the first valid entry's fails with an internal error (the engine groups by these).
    pub fn generate_batch(&self, entries: &mut [BatchEntry<'_>]) -> Vec<Result<Vec<RgbImage>>> {
        let mut results: Vec<Option<Result<Vec<RgbImage>>>> =
            entries.iter().map(|_| None).collect();
        let mut running: Vec<Running> = Vec::with_capacity(entries.len());
        for (index, entry) in entries.iter_mut().enumerate() {
            match self.start(index, entry) {
                Ok(r) if running.first().is_none_or(|first| shares_passes(first, &r)) => {
                    running.push(r)
                }
                Ok(_) => {
                    results[index] = Some(Err(WorkerError::Internal(
                        "a request with another schedule or size was batched".into(),
                    )))
                }
                Err(e) => results[index] = Some(Err(e)),
            }
        }
        let started = Instant::now();
        match self.denoise_batch(entries, &mut running, &mut results) {
            Ok(previews) => {
                // Preview decodes count as decoding, not denoising.
                let denoise = started.elapsed().saturating_sub(previews);
                for r in running {
                    let progress = &mut *entries[r.entry].progress;
                    progress.on_stage(Stage::Denoise, r.prepare + denoise);
                    let started = Instant::now();
                    let images = self.decode(&r.latents);
                    progress.on_stage(Stage::Decode, r.decode + started.elapsed());
                    results[r.entry] = Some(images);
                }
            }
            Err(e) => {
                let message = e.to_string();
                let mut error = Some(e);
                for r in running {
                    // The first keeps the error itself; the others get its text.
                    let e = error
                        .take()
                        .unwrap_or_else(|| WorkerError::Internal(message.clone()));
                    results[r.entry] = Some(Err(e));
                }
            }
        }
        self.release_offloaded();
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(WorkerError::Internal("a request got no result".into())))
            })
            .collect()
    }

    /// A batch of one: what `text_to_image`, `image_to_image` and `inpaint` run.
    pub(super) fn run_one(
        &self,
        request: &TextToImage,
        input: Input<'_>,
        progress: &mut dyn Progress,
    ) -> Result<Vec<RgbImage>> {
        let mut entries = [BatchEntry {
            request,
            input,
            progress,
        }];
        self.generate_batch(&mut entries)
            .pop()
            .unwrap_or_else(|| Err(WorkerError::Internal("a request got no result".into())))
    }

    /// Checks a request, encodes its prompt and prepares its initial latents and loop (the
    /// generator draws in diffusers' order, see `edit.rs`).
    fn start(&self, index: usize, entry: &mut BatchEntry<'_>) -> Result<Running> {
        let req = entry.request;
        self.check_request(req)?;
        if self.inpaint_unet && matches!(entry.input, Input::Text) {
            return Err(WorkerError::TaskDisabled(
                "text-to-image with an inpainting model".into(),
            ));
        }
        self.check_inputs(req, entry.input)?;
        let guidance = (req.guidance_scale > 1.0).then_some(req.guidance_scale);
        let started = Instant::now();
        let cond = self.conditioning(&req.prompt, &req.negative_prompt, req.n, guidance)?;
        entry
            .progress
            .on_stage(Stage::EncodePrompt, started.elapsed());
        let started = Instant::now();
        let scheduler = req.scheduler.build(&self.scheduler_config, req.steps)?;
        let rng = TorchRng::new(req.seed);
        let (plan, latents) = match entry.input {
            Input::Text => self.prepare_text(req, scheduler, rng)?,
            Input::Image { image, strength } => {
                self.prepare_image_to_image(req, image, strength, scheduler, rng)?
            }
            Input::Inpaint {
                image,
                mask,
                strength,
            } => self.prepare_inpaint(req, image, mask, strength, scheduler, rng)?,
        };
        let steps = plan.scheduler.timesteps().len().saturating_sub(plan.start);
        let wanted = entry.progress.partial_images().min(MAX_PARTIAL_IMAGES);
        Ok(Running {
            entry: index,
            cond,
            plan,
            latents,
            previews: preview_steps(wanted, steps),
            prepare: started.elapsed(),
            decode: Duration::ZERO,
        })
    }

    /// The shared loop. A request whose observer breaks leaves `running` with
    /// [`WorkerError::Cancelled`] in `results`, as does one whose preview fails, with that error.
    /// Returns the time spent decoding previews.
    fn denoise_batch(
        &self,
        entries: &mut [BatchEntry<'_>],
        running: &mut Vec<Running>,
        results: &mut [Option<Result<Vec<RgbImage>>>],
    ) -> Result<Duration> {
        let mut previews = Duration::ZERO;
        let Some(first) = running.first() else {
            return Ok(previews);
        };
        let (start, total) = (first.plan.start, first.plan.scheduler.timesteps().len());
        let steps = total.saturating_sub(start);
        for (done, step_index) in (start..total).enumerate() {
            if running.is_empty() {
                break;
            }
            self.batch_step(running, step_index)?;
            let step = done + 1;
            running.retain_mut(|r| {
                let progress = &mut *entries[r.entry].progress;
                let mut go_on = progress.on_step(step, steps, &r.latents).is_continue();
                if let (true, Some(index)) = (go_on, r.previews.iter().position(|&s| s == step)) {
                    let started = Instant::now();
                    match self.decode(&r.latents) {
                        Ok(images) => {
                            let took = started.elapsed();
                            r.decode += took;
                            previews += took;
                            go_on = progress.on_partial_images(index, images).is_continue();
                        }
                        Err(e) => {
                            results[r.entry] = Some(Err(e));
                            return false;
                        }
                    }
                }
                if !go_on {
                    results[r.entry] = Some(Err(WorkerError::Cancelled));
                }
                go_on
            });
        }
        Ok(previews)
    }

    /// One step for every running request: one UNet pass over all their rows, then each
    /// request's guidance, scheduler step and blending on its own slice of the output.
    fn batch_step(&self, running: &mut [Running], step_index: usize) -> Result<()> {
        let Some(first) = running.first() else {
            return Ok(());
        };
        let timestep = *first
            .plan
            .scheduler
            .timesteps()
            .get(step_index)
            .ok_or_else(|| {
                WorkerError::Internal(format!("step {step_index} is past the schedule"))
            })?;
        let mut inputs = Vec::with_capacity(running.len());
        let mut embeds = Vec::with_capacity(running.len());
        for r in running.iter() {
            // Scaling depends only on the step, so scale once and then duplicate for guidance.
            let scaled = r.plan.scheduler.scale_model_input(&r.latents, step_index)?;
            let mut input = match r.cond.guidance {
                Some(_) => Tensor::cat(&[&scaled, &scaled], 0)?,
                None => scaled,
            };
            if let Some(extra) = &r.plan.extra_channels {
                input = Tensor::cat(&[&input, extra], 1)?;
            }
            inputs.push(input);
            embeds.push(&r.cond.embeds);
        }
        let output = self
            .unet
            .get()?
            .forward(
                &Tensor::cat(&inputs, 0)?.to_dtype(self.dtype)?,
                timestep,
                &Tensor::cat(&embeds, 0)?,
            )?
            .to_dtype(DType::F32)?;
        let mut offset = 0;
        for r in running.iter_mut() {
            let rows = r.cond.embeds.dim(0)?;
            let own = output.narrow(0, offset, rows)?;
            offset += rows;
            let noise_pred = match r.cond.guidance {
                Some(g) => {
                    let halves = own.chunk(2, 0)?;
                    let (uncond, text) = (&halves[0], &halves[1]);
                    (uncond + ((text - uncond)? * g)?)?
                }
                None => own,
            };
            let plan = &mut r.plan;
            r.latents = plan
                .scheduler
                .step(&noise_pred, step_index, &r.latents, &mut plan.rng)?;
            if let Some(blend) = &plan.blend {
                r.latents = blend.apply(plan.scheduler.as_ref(), &r.latents, step_index + 1)?;
            }
        }
        Ok(())
    }
}

/// Whether two requests can share every UNet pass: the same timesteps from the same first step,
/// and latents of the same size.
fn shares_passes(a: &Running, b: &Running) -> bool {
    a.plan.start == b.plan.start
        && a.plan.scheduler.timesteps() == b.plan.scheduler.timesteps()
        && a.latents.dims().get(1..) == b.latents.dims().get(1..)
}

#[cfg(test)]
mod tests {
    use super::preview_steps;

    #[test]
    fn previews_are_evenly_spaced_and_never_the_last_step() {
        assert_eq!(preview_steps(0, 10), Vec::<usize>::new());
        assert_eq!(preview_steps(1, 10), [5]);
        assert_eq!(preview_steps(2, 3), [1, 2]);
        assert_eq!(preview_steps(3, 20), [5, 10, 15]);
        assert_eq!(preview_steps(3, 4), [1, 2, 3]);
        // Fewer steps than previews + 1: one preview per step but the last.
        assert_eq!(preview_steps(3, 3), [1, 2]);
        assert_eq!(preview_steps(2, 1), Vec::<usize>::new());
    }
}
