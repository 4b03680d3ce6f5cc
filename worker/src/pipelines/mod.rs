//! Generation pipelines: a loaded model plus the loop that turns a request into images.
//!
//! ```text
//! stable_diffusion.rs  SD 1.x/2.x text-to-image (tokenize → CLIP → denoise loop → VAE decode)
//! image.rs             decoded VAE output → 8-bit RGB images
//! ```

pub mod image;
pub mod stable_diffusion;
