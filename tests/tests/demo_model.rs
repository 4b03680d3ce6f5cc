//! The demo model (`models/demo`) as the README's run command serves it: the gateway with its
//! embedded worker on the repository's own `model_config.json`, driven over HTTP. Its pictures
//! must follow their prompts: the named background all round, a shape of the named colour inside
//! it, small shapes far smaller than medium ones (no size named), shapes without a named position
//! in the middle, shapes with a named position in that part of the picture, and swapping two
//! colours swaps the picture.

use anyhow::{Context, Result};
use fastfusion_tests::{repo_root, Gateway};
use image::RgbImage;
use serde_json::{json, Value};

/// The colours the demo model was trained on (scripts/demo-model/train.py `COLOURS`).
const PALETTE: [(&str, [u8; 3]); 8] = [
    ("red", [220, 30, 30]),
    ("orange", [250, 140, 0]),
    ("yellow", [250, 220, 0]),
    ("green", [30, 160, 50]),
    ("blue", [30, 70, 220]),
    ("purple", [130, 40, 180]),
    ("white", [245, 245, 245]),
    ("black", [15, 15, 15]),
];

/// One picture for `prompt` and `seed`, everything else as the default config says.
fn draw(gw: &mut Gateway, prompt: &str, seed: u64) -> Result<RgbImage> {
    let body = json!({"prompt": prompt, "seed": seed, "response_format": "b64_json"});
    let (status, answer) = gw.post_json("/v1/images/generations", &body)?;
    gw.first_image(status, &answer)
        .with_context(|| format!("{prompt} (seed {seed})"))
}

/// The palette colour nearest to a pixel.
fn nearest(pixel: [u8; 3]) -> &'static str {
    let distance = |c: [u8; 3]| -> i32 {
        (0..3)
            .map(|i| (i32::from(pixel[i]) - i32::from(c[i])).pow(2))
            .sum()
    };
    PALETTE
        .iter()
        .min_by_key(|(_, c)| distance(*c))
        .map_or("none", |(name, _)| name)
}

/// The palette colour most of `pixels` are nearest to, and its share.
fn dominant(pixels: &[[u8; 3]]) -> (&'static str, f64) {
    PALETTE
        .iter()
        .map(|(name, _)| (*name, share_of(pixels, name)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or(("none", 0.0))
}

/// The outer `ring` pixels of every side: background wherever the shape is (no shape reaches the
/// border: the training pictures keep a margin of 3 px).
fn border(image: &RgbImage, ring: u32) -> Vec<[u8; 3]> {
    let (w, h) = image.dimensions();
    image
        .enumerate_pixels()
        .filter(|(x, y, _)| *x < ring || *y < ring || *x >= w - ring || *y >= h - ring)
        .map(|(_, _, p)| p.0)
        .collect()
}

/// The share of `pixels` nearest to `colour`.
fn share_of(pixels: &[[u8; 3]], colour: &str) -> f64 {
    let hits = pixels.iter().filter(|p| nearest(**p) == colour).count();
    hits as f64 / pixels.len().max(1) as f64
}

fn all_pixels(image: &RgbImage) -> Vec<[u8; 3]> {
    image.pixels().map(|p| p.0).collect()
}

const SEEDS: [u64; 2] = [1, 2];

/// (prompt, shape colour, background colour, small?)
#[rustfmt::skip]
const PROMPTS: [(&str, &str, &str, bool); 8] = [
    ("a small red circle on a blue background", "red", "blue", true),
    ("a small yellow square on a black background", "yellow", "black", true),
    ("a small white triangle on a green background", "white", "green", true),
    ("a small blue diamond on an orange background", "blue", "orange", true),
    ("a green circle on a purple background", "green", "purple", false),
    ("an orange square on a blue background", "orange", "blue", false),
    ("a black triangle on a yellow background", "black", "yellow", false),
    ("a purple diamond on a white background", "purple", "white", false),
];

#[test]
fn demo_model_draws_the_colours_sizes_and_backgrounds_the_prompt_says() -> Result<()> {
    let mut gw = Gateway::start_on_file(&repo_root().join("model_config.json"))?;
    let models: Value = gw
        .client
        .get(format!("{}/v1/models", gw.base))
        .send()?
        .json()?;
    assert_eq!(
        models["data"][0]["endpoints"],
        json!(["generations", "edits", "variations"]),
        "{models}"
    );

    let (mut small, mut medium) = (Vec::new(), Vec::new());
    for (prompt, colour, background, is_small) in PROMPTS {
        for seed in SEEDS {
            let image = draw(&mut gw, prompt, seed)?;
            assert_eq!(
                image.dimensions(),
                (64, 64),
                "size auto is the native 64×64"
            );
            // The border is the named background…
            let (got, part) = dominant(&border(&image, 4));
            assert!(
                got == background && part >= 0.75,
                "{prompt} (seed {seed}): the border is {got} ({part:.2}), not {background}"
            );
            // …and a shape of the named colour sits inside it.
            let pixels = all_pixels(&image);
            let covered = share_of(&pixels, colour);
            assert!(
                covered >= 0.02 && share_of(&border(&image, 2), colour) < 0.1,
                "{prompt} (seed {seed}): {colour} covers {covered:.3} of the picture"
            );
            if is_small {
                small.push(covered);
            } else {
                // No position named: the middle of the picture (the central 16×16 pixels, inside
                // every medium shape) is the shape's colour.
                let middle: Vec<[u8; 3]> = image
                    .enumerate_pixels()
                    .filter(|(x, y, _)| (24..40).contains(x) && (24..40).contains(y))
                    .map(|(_, _, p)| p.0)
                    .collect();
                let (got, part) = dominant(&middle);
                assert!(
                    got == colour && part >= 0.6,
                    "{prompt} (seed {seed}): the middle is {got} ({part:.2}), not {colour}"
                );
                medium.push(covered);
            }
        }
    }
    // A medium shape (no size named: half the width, a quarter of the area) covers far more
    // than a small one (a quarter of the width).
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (small, medium) = (mean(&small), mean(&medium));
    assert!(
        medium > 2.0 * small && (0.08..0.45).contains(&medium),
        "medium shapes cover {medium:.3} of the picture on average, small ones {small:.3}"
    );

    // Two prompts, one seed: swapping the colours swaps the picture.
    let a = draw(&mut gw, "a red circle on a blue background", 7)?;
    let b = draw(&mut gw, "a blue circle on a red background", 7)?;
    assert_eq!(dominant(&border(&a, 4)).0, "blue");
    assert_eq!(dominant(&border(&b, 4)).0, "red");
    assert!(share_of(&all_pixels(&a), "red") > 0.05);
    assert!(share_of(&all_pixels(&b), "blue") > 0.05);
    let mean_diff = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| f64::from(x.abs_diff(*y)))
        .sum::<f64>()
        / a.as_raw().len() as f64;
    assert!(
        mean_diff > 60.0,
        "the two prompts differ by only {mean_diff:.1} per channel on average"
    );
    Ok(())
}

/// (prompt, shape colour, column, row): the named place in a 3×3 grid (0 = left / top).
#[rustfmt::skip]
const PLACED: [(&str, &str, u32, u32); 10] = [
    ("a small red circle on a blue background, top left", "red", 0, 0),
    ("a small yellow square on a black background, top", "yellow", 1, 0),
    ("a small white triangle on a green background, top right", "white", 2, 0),
    ("a small blue diamond on an orange background, left", "blue", 0, 1),
    ("a small green circle on a purple background, right", "green", 2, 1),
    ("a small orange square on a blue background, bottom left", "orange", 0, 2),
    ("a small black triangle on a yellow background, bottom", "black", 1, 2),
    ("a small purple diamond on a white background, bottom right", "purple", 2, 2),
    ("a medium red square on a green background, left", "red", 0, 1),
    ("a medium yellow circle on a purple background, bottom", "yellow", 1, 2),
];

#[test]
fn demo_model_puts_the_shape_where_the_prompt_says() -> Result<()> {
    let mut gw = Gateway::start_on_file(&repo_root().join("model_config.json"))?;
    for (prompt, colour, column, row) in PLACED {
        for seed in SEEDS {
            let image = draw(&mut gw, prompt, seed)?;
            let third = image.width() as f64 / 3.0;
            let cell =
                |x: u32, y: u32| ((f64::from(x) / third) as u32, (f64::from(y) / third) as u32);
            let shape: Vec<(u32, u32)> = image
                .enumerate_pixels()
                .filter(|(_, _, p)| nearest(p.0) == colour)
                .map(|(x, y, _)| (x, y))
                .collect();
            assert!(
                shape.len() >= 25,
                "{prompt} (seed {seed}): only {} pixels are {colour}",
                shape.len()
            );
            // The shape's centre lies on the named side of the middle band (the central quarter
            // of the width, 24..40 of 64 px: a medium shape at "bottom" is centred at y = 45,
            // near the ninths' line at 42.7), and most of a small shape lies in the named ninth
            // (a medium one, half the width, spills over into the next ninths).
            let n = shape.len() as f64;
            let cx = shape.iter().map(|p| f64::from(p.0)).sum::<f64>() / n;
            let cy = shape.iter().map(|p| f64::from(p.1)).sum::<f64>() / n;
            let inside = shape
                .iter()
                .filter(|p| cell(p.0, p.1) == (column, row))
                .count() as f64
                / n;
            let band = |v: f64| {
                let v = v / f64::from(image.width());
                if v < 0.375 {
                    0
                } else if v <= 0.625 {
                    1
                } else {
                    2
                }
            };
            assert!(
                (band(cx), band(cy)) == (column, row),
                "{prompt} (seed {seed}): the {colour} shape is centred at ({cx:.0}, {cy:.0})"
            );
            assert!(
                inside >= 0.5 || !prompt.contains("small"),
                "{prompt} (seed {seed}): only {inside:.2} of the {colour} pixels are in the named place"
            );
        }
    }
    Ok(())
}
