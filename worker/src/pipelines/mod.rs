//! Generation pipelines: a loaded model plus the loop that turns a request into images.
//!
//! ```text
//! stable_diffusion.rs  SD 1.x/2.x: loading and the pieces every task shares (tokenize → CLIP →
//!                      denoise loop → VAE decode), text-to-image
//! stable_diffusion/edit.rs  image-to-image and inpainting (VAE encode, strength, masks)
//! stable_diffusion/batch.rs the denoising loop over one or several requests sharing UNet passes
//!                      (dynamic batching), and preview decodes
//! image.rs             decoded VAE output → 8-bit RGB images
//! ```

pub mod image;
pub mod stable_diffusion;
