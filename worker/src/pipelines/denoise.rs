//! THE denoising loop, for every family: several requests through shared forward passes (the
//! pipeline's side of dynamic batching; the engine decides which requests run together), and the
//! loop every single request runs too.
//!
//! Each request keeps everything that makes its images its own: its prompt's conditioning and
//! guidance scale, its generator (initial noise, and an ancestral scheduler's per-step noise, are
//! drawn from it in the same order as in a run alone), its scheduler state, its image-task inputs
//! and its observer. Only the denoiser pass is shared:
//!
//! ```text
//! entries ─check, encode prompt, prepare (each)─▶ Running { conditioning, plan, latents }
//!         (all must share the timesteps, the first step, the latent size and the
//!          conditioning's shape)
//! per step   denoiser([rows of a | rows of b | …], t, [conditioning of a | of b | …])
//!            ─split─▶ a: guidance(g_a) → scheduler_a.step(rng_a) [→ blend_a] → progress_a
//!                     b: …            (a Break drops that request's rows from the next step on)
//! each       VAE decode, one image at a time
//! ```
//!
//! A request's rows are laid out as in a run alone (`[scaled×n; scaled×n]` against
//! `[uncond×n; cond×n]` with guidance, plus an inpainting model's extra channels), so a batch of
//! one is exactly the solo pipeline: `text_to_image`, `image_to_image` and `inpaint` are that.
//!
//! Previews ([`Progress::partial_images`]): after the steps [`preview_steps`] picks, the
//! request's current latents are VAE-decoded like the final ones. They are the scheduler's
//! `x_t` (what diffusers' step callbacks see), not a predicted `x_0`: every scheduler has them,
//! and a preview then shows honestly how far the denoising has got.

use std::time::{Duration, Instant};

use candle_core::Tensor;
use image::RgbImage;

use super::conditioning::Conditioning;
use super::{BatchEntry, Input, Pipeline, Progress, Stage, TextToImage};
use crate::error::{Result, WorkerError};
use crate::rng::TorchRng;
use crate::schedulers::Scheduler;

/// Most previews one request may ask for (OpenAI's `partial_images` is 0 to 3).
pub const MAX_PARTIAL_IMAGES: usize = 3;

/// How the denoising loop runs for one request.
pub(super) struct Plan {
    pub(super) scheduler: Box<dyn Scheduler>,
    /// The request's generator, after the draws that made the initial latents (ancestral
    /// schedulers keep drawing from it).
    pub(super) rng: TorchRng,
    /// Loop index of the first step: 0, or later for image-to-image strengths below 1.
    pub(super) start: usize,
    /// Inpainting models: what they take besides the latents (mask and masked-image latents),
    /// appended to the denoiser input's channels, already doubled for guidance.
    pub(super) extra_channels: Option<Tensor>,
    /// Inpainting with an ordinary model: keeps the original outside the mask after each step.
    pub(super) blend: Option<Blend>,
    /// FLUX: denoise with the Fill transformer loaded beside the ordinary one.
    pub(super) fill: bool,
}

impl Plan {
    pub(super) fn new(scheduler: Box<dyn Scheduler>, rng: TorchRng) -> Self {
        Plan {
            scheduler,
            rng,
            start: 0,
            extra_channels: None,
            blend: None,
            fill: false,
        }
    }
}

/// Inpainting with an ordinary model: after each step, outside the mask the latents are replaced
/// by the original image's latents noised to the next step's level (diffusers' blending).
pub(super) struct Blend {
    /// The input image's latents, (n, C, h, w) float32.
    pub(super) original: Tensor,
    /// The noise the initial latents were made with, reused to noise the original.
    pub(super) noise: Tensor,
    /// (n, 1, h, w) float32: 1 where the model repaints, 0 where the original stays.
    pub(super) mask: Tensor,
}

impl Blend {
    /// `(1 - mask) · original_noised + mask · latents`, with the original noised to loop index
    /// `next` (not noised after the last step).
    fn apply(&self, scheduler: &dyn Scheduler, latents: &Tensor, next: usize) -> Result<Tensor> {
        let original = if next < scheduler.timesteps().len() {
            scheduler.add_noise(&self.original, &self.noise, next)?
        } else {
            self.original.clone()
        };
        let keep = self.mask.affine(-1.0, 1.0)?;
        Ok((original.broadcast_mul(&keep)? + latents.broadcast_mul(&self.mask)?)?)
    }
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

impl Pipeline {
    /// Runs `entries` together: one UNet pass per step for all of them. Returns one result per
    /// entry, in order. A request that fails its checks or is cancelled (its observer breaks)
    /// fails alone; a failed shared pass fails every request still in the loop. Entries must
    /// share the schedule (scheduler kind, steps, strength) and the size; one that does not
    /// share the first valid entry's fails with an internal error (the engine groups by these).
    pub fn generate_batch(&self, entries: &mut [BatchEntry<'_>]) -> Vec<Result<Vec<RgbImage>>> {
        let mut results: Vec<Option<Result<Vec<RgbImage>>>> =
            entries.iter().map(|_| None).collect();
        // The batch's LoRA set (the engine batches only requests with the same one) stays active
        // for every text encode and denoiser pass below, and is switched off when the guard drops.
        let set = entries
            .first()
            .map(|e| e.request.loras.clone())
            .unwrap_or_default();
        let _active = match self.loras.activate(&set) {
            Ok(guard) => guard,
            Err(e) => {
                let message = e.to_string();
                let mut error = Some(e);
                return entries
                    .iter()
                    .map(|_| {
                        Err(error
                            .take()
                            .unwrap_or_else(|| WorkerError::Internal(message.clone())))
                    })
                    .collect();
            }
        };
        let mut running: Vec<Running> = Vec::with_capacity(entries.len());
        for (index, entry) in entries.iter_mut().enumerate() {
            if entry.request.loras != set {
                results[index] = Some(Err(WorkerError::Internal(
                    "a request with another LoRA set was batched".into(),
                )));
                continue;
            }
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
    /// generator draws in diffusers' order, see `image_tasks.rs`).
    fn start(&self, index: usize, entry: &mut BatchEntry<'_>) -> Result<Running> {
        let req = entry.request;
        self.check_request(req)?;
        if self.inpaint_unet && matches!(entry.input, Input::Text | Input::Redux { .. }) {
            return Err(WorkerError::TaskDisabled(
                "text-to-image with an inpainting model".into(),
            ));
        }
        self.check_inputs(req, entry.input)?;
        let started = Instant::now();
        let cond = self.request_conditioning(req, entry.input)?;
        entry
            .progress
            .on_stage(Stage::EncodePrompt, started.elapsed());
        let started = Instant::now();
        let scheduler = self.scheduler(req)?;
        let rng = TorchRng::new(req.seed);
        let (plan, latents) = match entry.input {
            Input::Text | Input::Redux { .. } => self.prepare_text(req, scheduler, rng)?,
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

    /// One step for every running request: one denoiser pass over all their rows, then each
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
        let mut conds = Vec::with_capacity(running.len());
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
            conds.push(&r.cond);
        }
        let denoiser = match (first.plan.fill, &self.fill) {
            (true, Some(fill)) => fill,
            (true, None) => {
                return Err(WorkerError::Internal(
                    "a Fill step without a Fill transformer".into(),
                ))
            }
            (false, _) => &self.denoiser,
        };
        let output = denoiser.predict(
            &Tensor::cat(&inputs, 0)?.to_dtype(self.dtype)?,
            timestep,
            &Conditioning::cat(&conds)?,
        )?;
        let mut offset = 0;
        for r in running.iter_mut() {
            let rows = r.cond.rows()?;
            let own = output.narrow(0, offset, rows)?;
            offset += rows;
            let prediction = match r.cond.guidance {
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
                .step(&prediction, step_index, &r.latents, &mut plan.rng)?;
            if let Some(blend) = &plan.blend {
                r.latents = blend.apply(plan.scheduler.as_ref(), &r.latents, step_index + 1)?;
            }
        }
        Ok(())
    }
}

/// Whether two requests can share every denoiser pass: the same timesteps from the same first
/// step, latents of the same size and conditioning of the same shape.
fn shares_passes(a: &Running, b: &Running) -> bool {
    let shape = |t: Option<&Tensor>| t.map(|t| t.dims()[1..].to_vec());
    a.plan.start == b.plan.start
        && a.plan.fill == b.plan.fill
        && a.plan.scheduler.timesteps() == b.plan.scheduler.timesteps()
        && a.latents.dims().get(1..) == b.latents.dims().get(1..)
        && shape(Some(&a.cond.context)) == shape(Some(&b.cond.context))
        && shape(a.cond.pooled.as_ref()) == shape(b.cond.pooled.as_ref())
        && shape(a.cond.time_ids.as_ref()) == shape(b.cond.time_ids.as_ref())
        && a.cond.guidance_embed.is_some() == b.cond.guidance_embed.is_some()
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
