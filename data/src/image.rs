//! Images: decoding (JPEG through zune-jpeg, PNG through `png`, WebP through `image-webp`;
//! the format sniffed from the bytes, as PIL does), the crops (shorter side then centre crop
//! for evaluation, random-resized crop for training, both resampled once with a bicubic
//! filter by fast_image_resize), and CLIP's normalisation into a channel-major `f32` buffer.
//! Encoders (JPEG, PNG, lossless WebP) for `weaver data pack` and for tests.
//!
//! The loader's hot path keeps its buffers: a decoding thread decodes every image into the
//! same [`Rgb`] ([`decode_into`]), resamples the crop to 8-bit RGB ([`crop_resize`]), and
//! the batch builder expands it once, through [`Normalizer`]'s tables, straight into the
//! step's tensor (normalise, HWC → CHW and collation in one pass).

use std::io::Cursor;
use std::mem::MaybeUninit;

use fast_image_resize as fr;
use weaver_models::data::Rng;

/// CLIP's (OpenAI's) per-channel mean, as open_clip's `OPENAI_DATASET_MEAN`.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP's per-channel standard deviation (`OPENAI_DATASET_STD`).
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];
/// Largest image decoded (PIL's decompression-bomb limit); bigger ones are bad samples.
pub const MAX_PIXELS: u64 = 89_478_485;
/// Random-resized-crop area range, as open_clip's default `scale=(0.9, 1.0)`.
pub const CROP_SCALE: (f64, f64) = (0.9, 1.0);
/// Random-resized-crop aspect-ratio range, as torchvision's default.
pub const CROP_RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);

/// An 8-bit RGB image, row-major, 3 bytes a pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rgb {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width × height × 3` bytes.
    pub pixels: Vec<u8>,
}

/// Image formats weaver reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// JPEG.
    Jpeg,
    /// PNG.
    Png,
    /// WebP (lossy or lossless).
    Webp,
}

/// The format of `bytes`, from its signature.
pub fn sniff(bytes: &[u8]) -> Option<Format> {
    if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        Some(Format::Jpeg)
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(Format::Png)
    } else if bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some(Format::Webp)
    } else {
        None
    }
}

fn check_size(w: u32, h: u32) -> Result<(), String> {
    if w == 0 || h == 0 {
        return Err(format!("empty image ({w}×{h})"));
    }
    if u64::from(w) * u64::from(h) > MAX_PIXELS {
        return Err(format!("{w}×{h} exceeds {MAX_PIXELS} pixels"));
    }
    Ok(())
}

/// Decodes a JPEG, PNG or WebP image to RGB (alpha dropped, grey expanded).
pub fn decode(bytes: &[u8]) -> Result<Rgb, String> {
    let mut img = Rgb {
        width: 0,
        height: 0,
        pixels: Vec::new(),
    };
    decode_into(bytes, &mut img)?;
    Ok(img)
}

/// [`decode`] into `img`, reusing its pixel buffer: a thread that decodes image after image
/// allocates (and faults in fresh pages) only when an image is larger than any before.
/// On error `img` holds no image (0 × 0).
pub fn decode_into(bytes: &[u8], img: &mut Rgb) -> Result<(), String> {
    img.width = 0;
    img.height = 0;
    let (w, h) = match sniff(bytes) {
        Some(Format::Jpeg) => decode_jpeg(bytes, &mut img.pixels),
        Some(Format::Png) => decode_png(bytes, &mut img.pixels),
        Some(Format::Webp) => decode_webp(bytes, &mut img.pixels),
        None => Err(format!(
            "not a JPEG, PNG or WebP image (starts with {:02x?})",
            &bytes[..bytes.len().min(4)]
        )),
    }
    .inspect_err(|_| img.pixels.clear())?;
    img.width = w;
    img.height = h;
    Ok(())
}

fn decode_jpeg(bytes: &[u8], pixels: &mut Vec<u8>) -> Result<(u32, u32), String> {
    use zune_core::bytestream::ZCursor;
    use zune_core::colorspace::ColorSpace;
    use zune_core::options::DecoderOptions;
    // `new_fast`: zune's SIMD paths (the default options are the portable, slower ones).
    let opts = DecoderOptions::new_fast()
        .jpeg_set_out_colorspace(ColorSpace::RGB)
        .set_max_width(1 << 16)
        .set_max_height(1 << 16);
    let mut d = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), opts);
    d.decode_headers().map_err(|e| format!("JPEG: {e:?}"))?;
    let info = d.info().ok_or("JPEG: no header")?;
    let (w, h) = (u32::from(info.width), u32::from(info.height));
    check_size(w, h)?;
    let n = w as usize * h as usize * 3;
    if d.output_buffer_size() != Some(n) {
        return Err(format!(
            "JPEG: {:?} output bytes for {w}×{h} RGB",
            d.output_buffer_size()
        ));
    }
    // Every byte is overwritten by the decoder; `resize` only writes when the buffer grows.
    pixels.resize(n, 0);
    d.decode_into(pixels).map_err(|e| format!("JPEG: {e:?}"))?;
    Ok((w, h))
}

/// Expands `raw` (`channels` samples a pixel) into RGB in `pixels`.
fn to_rgb(
    raw: &[u8],
    channels: usize,
    w: u32,
    h: u32,
    pixels: &mut Vec<u8>,
) -> Result<(u32, u32), String> {
    let n = w as usize * h as usize;
    if raw.len() < n * channels {
        return Err(format!("{} bytes for {w}×{h}×{channels}", raw.len()));
    }
    pixels.clear();
    match channels {
        3 => pixels.extend_from_slice(&raw[..n * 3]),
        4 => pixels.extend(
            raw[..n * 4]
                .chunks_exact(4)
                .flat_map(|p| [p[0], p[1], p[2]]),
        ),
        1 => pixels.extend(raw[..n].iter().flat_map(|&g| [g, g, g])),
        2 => pixels.extend(
            raw[..n * 2]
                .chunks_exact(2)
                .flat_map(|p| [p[0], p[0], p[0]]),
        ),
        c => return Err(format!("{c} channels")),
    }
    Ok((w, h))
}

fn decode_png(bytes: &[u8], pixels: &mut Vec<u8>) -> Result<(u32, u32), String> {
    let mut d = png::Decoder::new(Cursor::new(bytes));
    d.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut r = d.read_info().map_err(|e| format!("PNG: {e}"))?;
    let (w, h) = (r.info().width, r.info().height);
    check_size(w, h)?;
    let size = r.output_buffer_size().ok_or("PNG: image too large")?;
    let mut buf = vec![0u8; size];
    let out = r.next_frame(&mut buf).map_err(|e| format!("PNG: {e}"))?;
    let channels = out.color_type.samples();
    to_rgb(
        &buf[..out.buffer_size()],
        channels,
        out.width,
        out.height,
        pixels,
    )
}

fn decode_webp(bytes: &[u8], pixels: &mut Vec<u8>) -> Result<(u32, u32), String> {
    let mut d =
        image_webp::WebPDecoder::new(Cursor::new(bytes)).map_err(|e| format!("WebP: {e}"))?;
    let (w, h) = d.dimensions();
    check_size(w, h)?;
    let size = d.output_buffer_size().ok_or("WebP: image too large")?;
    let mut buf = vec![0u8; size];
    d.read_image(&mut buf).map_err(|e| format!("WebP: {e}"))?;
    to_rgb(&buf, if d.has_alpha() { 4 } else { 3 }, w, h, pixels)
}

/// A crop of the source image, in source pixels (fractional, as torchvision computes
/// them before resampling).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Crop {
    /// Left edge.
    pub left: f64,
    /// Top edge.
    pub top: f64,
    /// Width.
    pub width: f64,
    /// Height.
    pub height: f64,
}

/// torchvision's `Resize(size)` then `CenterCrop(size)` as one crop of the source: the
/// centred square whose side is the shorter side.
pub fn center_crop(w: u32, h: u32) -> Crop {
    let s = f64::from(w.min(h));
    Crop {
        left: (f64::from(w) - s) / 2.0,
        top: (f64::from(h) - s) / 2.0,
        width: s,
        height: s,
    }
}

/// torchvision's `RandomResizedCrop.get_params` with open_clip's scale (0.9, 1.0), drawn
/// from `rng` (seeded per sample, so that a resumed run crops the same way).
pub fn random_resized_crop(w: u32, h: u32, rng: &mut Rng) -> Crop {
    let (wf, hf) = (f64::from(w), f64::from(h));
    let area = wf * hf;
    let (lr0, lr1) = (CROP_RATIO.0.ln(), CROP_RATIO.1.ln());
    for _ in 0..10 {
        let target = area * (CROP_SCALE.0 + (CROP_SCALE.1 - CROP_SCALE.0) * f64::from(rng.unit()));
        let ratio = (lr0 + (lr1 - lr0) * f64::from(rng.unit())).exp();
        let cw = (target * ratio).sqrt().round();
        let ch = (target / ratio).sqrt().round();
        if cw > 0.0 && cw <= wf && ch > 0.0 && ch <= hf {
            let top = rng.below((hf - ch) as usize + 1) as f64;
            let left = rng.below((wf - cw) as usize + 1) as f64;
            return Crop {
                left,
                top,
                width: cw,
                height: ch,
            };
        }
    }
    // Fallback: the whole image, clamped to the ratio range, centred.
    let in_ratio = wf / hf;
    let (cw, ch) = if in_ratio < CROP_RATIO.0 {
        (wf, (wf / CROP_RATIO.0).round())
    } else if in_ratio > CROP_RATIO.1 {
        ((hf * CROP_RATIO.1).round(), hf)
    } else {
        (wf, hf)
    };
    Crop {
        left: ((wf - cw) / 2.0).floor(),
        top: ((hf - ch) / 2.0).floor(),
        width: cw,
        height: ch,
    }
}

/// Resamples `crop` of `img` to `size × size` (bicubic, antialiased when shrinking, as PIL)
/// and writes it normalised with CLIP's mean and std, channel-major, into `out`
/// (`3 × size × size` values).
pub fn crop_resize_normalize(
    resizer: &mut fr::Resizer,
    img: &Rgb,
    crop: Crop,
    size: usize,
    out: &mut [f32],
) -> Result<(), String> {
    let mut rgb = vec![0u8; 3 * size * size];
    crop_resize(resizer, img, crop, size, &mut rgb)?;
    normalize(&rgb, size, out);
    Ok(())
}

/// Resamples `crop` of `img` to `size × size` 8-bit RGB, row-major, into `out`
/// (`size × size × 3` bytes), with a [`Resampler`] made for the call.
pub fn crop_resize(
    resizer: &mut fr::Resizer,
    img: &Rgb,
    crop: Crop,
    size: usize,
    out: &mut [u8],
) -> Result<(), String> {
    let mut r = Resampler {
        resizer: std::mem::take(resizer),
        rows: Vec::new(),
    };
    let done = r.crop_resize(img, crop, size, out);
    *resizer = r.resizer;
    done
}

/// PIL's bicubic resampling (what torchvision's `resized_crop` and `Resize` do on PIL
/// images) through fast_image_resize's SIMD convolutions, with its buffers kept between
/// calls: Catmull-Rom (bicubic, a = −0.5, PIL's `BICUBIC`), its support widened by the
/// scale when shrinking (antialiased), and PIL's order of passes — horizontal, an 8-bit
/// intermediate, then vertical. (fast_image_resize on its own runs the vertical pass first
/// on 8-bit images, which clips the kernel's overshoot at another point: up to ~10 levels
/// apart from PIL beside saturated edges.)
#[derive(Debug, Default)]
pub struct Resampler {
    resizer: fr::Resizer,
    /// The horizontal pass's output: `size` columns of the rows the vertical pass reads.
    rows: Vec<u8>,
}

impl Resampler {
    /// A resampler with empty buffers.
    pub fn new() -> Resampler {
        Resampler::default()
    }

    /// Resamples `crop` of `img` to `size × size` 8-bit RGB, row-major, into `out`
    /// (`size × size × 3` bytes).
    pub fn crop_resize(
        &mut self,
        img: &Rgb,
        crop: Crop,
        size: usize,
        out: &mut [u8],
    ) -> Result<(), String> {
        let err = |e: &dyn std::fmt::Display| format!("resize: {e}");
        let side = u32::try_from(size).map_err(|_| format!("resize: output side {size}"))?;
        let bicubic = fr::ResizeAlg::Convolution(fr::FilterType::CatmullRom);
        // The rows the vertical pass can reach: the crop and the kernel's radius (2 source
        // pixels per output pixel, widened by the scale) around it.
        let radius = 2.0 * (crop.height / size as f64).max(1.0);
        let first = (crop.top - radius).floor().max(0.0);
        let last = (crop.top + crop.height + radius)
            .ceil()
            .min(f64::from(img.height));
        if !(first < last && crop.width > 0.0 && crop.height > 0.0) {
            return Err(format!("resize: empty crop {crop:?}"));
        }
        let n_rows = (last - first) as u32;
        self.rows.resize(size * n_rows as usize * 3, 0);
        let src =
            fr::images::ImageRef::new(img.width, img.height, &img.pixels, fr::PixelType::U8x3)
                .map_err(|e| err(&e))?;
        let mut rows =
            fr::images::Image::from_slice_u8(side, n_rows, &mut self.rows, fr::PixelType::U8x3)
                .map_err(|e| err(&e))?;
        // Whole rows, the height unchanged: fast_image_resize runs the horizontal pass only.
        let h = fr::ResizeOptions::new()
            .crop(crop.left, first, crop.width, f64::from(n_rows))
            .resize_alg(bicubic);
        self.resizer
            .resize(&src, &mut rows, &h)
            .map_err(|e| err(&e))?;
        // All the columns, the width unchanged: the vertical pass only.
        let mut dst = fr::images::Image::from_slice_u8(side, side, out, fr::PixelType::U8x3)
            .map_err(|e| err(&e))?;
        let v = fr::ResizeOptions::new()
            .crop(0.0, crop.top - first, f64::from(side), crop.height)
            .resize_alg(bicubic);
        self.resizer
            .resize(&rows, &mut dst, &v)
            .map_err(|e| err(&e))
    }
}

/// Channel-major CLIP-normalised floats of an interleaved RGB buffer.
pub fn normalize(rgb: &[u8], size: usize, out: &mut [f32]) {
    let plane = size * size;
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * CLIP_STD[c]));
    let shift: [f32; 3] = std::array::from_fn(|c| CLIP_MEAN[c] / CLIP_STD[c]);
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (i, p) in rgb.chunks_exact(3).enumerate().take(plane) {
        r[i] = f32::from(p[0]) * scale[0] - shift[0];
        g[i] = f32::from(p[1]) * scale[1] - shift[1];
        b[i] = f32::from(p[2]) * scale[2] - shift[2];
    }
}

/// CLIP's normalisation as a table per channel: [`normalize`]'s arithmetic done once for
/// each of the 256 byte values (the same `f32`s, bit for bit), so that expanding an image
/// is a table look-up per value.
#[derive(Debug, Clone)]
pub struct Normalizer {
    table: [[f32; 256]; 3],
}

impl Default for Normalizer {
    fn default() -> Normalizer {
        Normalizer::clip()
    }
}

impl Normalizer {
    /// The tables of CLIP's mean and std.
    pub fn clip() -> Normalizer {
        let mut table = [[0f32; 256]; 3];
        for (c, t) in table.iter_mut().enumerate() {
            let scale = 1.0 / (255.0 * CLIP_STD[c]);
            let shift = CLIP_MEAN[c] / CLIP_STD[c];
            for (v, x) in t.iter_mut().enumerate() {
                *x = v as f32 * scale - shift;
            }
        }
        Normalizer { table }
    }

    /// Writes interleaved RGB `rgb` (`3 × plane` bytes) normalised and channel-major into
    /// `out` (`3 × plane` values, every one written: `out` may be uninitialised memory, as
    /// a freshly allocated batch tensor is).
    pub fn write_chw(&self, rgb: &[u8], out: &mut [MaybeUninit<f32>]) {
        let plane = rgb.len() / 3;
        assert!(
            rgb.len() == 3 * plane && out.len() == 3 * plane,
            "normalise: {} bytes into {} values",
            rgb.len(),
            out.len()
        );
        let (r, rest) = out.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        let [tr, tg, tb] = &self.table;
        for (((p, r), g), b) in rgb
            .chunks_exact(3)
            .zip(r.iter_mut())
            .zip(g.iter_mut())
            .zip(b.iter_mut())
        {
            r.write(tr[usize::from(p[0])]);
            g.write(tg[usize::from(p[1])]);
            b.write(tb[usize::from(p[2])]);
        }
    }

    /// [`Normalizer::write_chw`] into a new vector.
    pub fn to_chw(&self, rgb: &[u8]) -> Vec<f32> {
        let mut v = Vec::with_capacity(rgb.len());
        self.write_chw(rgb, &mut v.spare_capacity_mut()[..rgb.len()]);
        // SAFETY: `write_chw` initialised the first `rgb.len()` elements (it writes every
        // element of the slice it is given, or panics).
        unsafe { v.set_len(rgb.len()) };
        v
    }
}

/// Resizes `img` so that its shorter side is `side` (keeping the aspect ratio; never
/// enlarges), for `weaver data pack --image-size`.
pub fn shrink_shorter_side(resizer: &mut fr::Resizer, img: &Rgb, side: u32) -> Result<Rgb, String> {
    let short = img.width.min(img.height);
    if short <= side {
        return Ok(img.clone());
    }
    let scale = f64::from(side) / f64::from(short);
    let w = ((f64::from(img.width) * scale).round() as u32).max(1);
    let h = ((f64::from(img.height) * scale).round() as u32).max(1);
    let src = fr::images::ImageRef::new(img.width, img.height, &img.pixels, fr::PixelType::U8x3)
        .map_err(|e| format!("resize: {e}"))?;
    let mut dst = fr::images::Image::new(w, h, fr::PixelType::U8x3);
    let opts =
        fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::CatmullRom));
    resizer
        .resize(&src, &mut dst, &opts)
        .map_err(|e| format!("resize: {e}"))?;
    Ok(Rgb {
        width: w,
        height: h,
        pixels: dst.into_vec(),
    })
}

/// Encodes RGB as JPEG at `quality` (1–100).
pub fn encode_jpeg(img: &Rgb, quality: u8) -> Result<Vec<u8>, String> {
    let (w, h) = (
        u16::try_from(img.width).map_err(|_| "JPEG: wider than 65535")?,
        u16::try_from(img.height).map_err(|_| "JPEG: taller than 65535")?,
    );
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, quality)
        .encode(&img.pixels, w, h, jpeg_encoder::ColorType::Rgb)
        .map_err(|e| format!("JPEG: {e}"))?;
    Ok(out)
}

/// Encodes RGB as PNG.
pub fn encode_png(img: &Rgb) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    {
        let mut e = png::Encoder::new(&mut out, img.width, img.height);
        e.set_color(png::ColorType::Rgb);
        e.set_depth(png::BitDepth::Eight);
        let mut w = e.write_header().map_err(|e| format!("PNG: {e}"))?;
        w.write_image_data(&img.pixels)
            .map_err(|e| format!("PNG: {e}"))?;
    }
    Ok(out)
}

/// Encodes RGB as lossless WebP.
pub fn encode_webp(img: &Rgb) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    image_webp::WebPEncoder::new(&mut out)
        .encode(
            &img.pixels,
            img.width,
            img.height,
            image_webp::ColorType::Rgb8,
        )
        .map_err(|e| format!("WebP: {e}"))?;
    Ok(out)
}

/// A test picture: smooth gradients plus a bright square whose place depends on `seed`.
pub fn test_pattern(w: u32, h: u32, seed: u64) -> Rgb {
    let mut rng = Rng::new(seed, 7, 0);
    let (sx, sy) = (rng.below(w as usize), rng.below(h as usize));
    let side = (w.min(h) / 4).max(1) as usize;
    let tint = [
        rng.below(256) as u8,
        rng.below(256) as u8,
        rng.below(256) as u8,
    ];
    let mut pixels = Vec::with_capacity(w as usize * h as usize * 3);
    for y in 0..h as usize {
        for x in 0..w as usize {
            let inside = x >= sx && x < sx + side && y >= sy && y < sy + side;
            if inside {
                pixels.extend_from_slice(&tint);
            } else {
                pixels.extend_from_slice(&[
                    (x * 255 / w as usize) as u8,
                    (y * 255 / h as usize) as u8,
                    ((x + y) * 127 / (w + h) as usize) as u8,
                ]);
            }
        }
    }
    Rgb {
        width: w,
        height: h,
        pixels,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_format_decodes_to_the_same_pixels_losslessly() {
        let img = test_pattern(40, 30, 1);
        assert_eq!(decode(&encode_png(&img).unwrap()).unwrap(), img);
        assert_eq!(decode(&encode_webp(&img).unwrap()).unwrap(), img);
        let j = decode(&encode_jpeg(&img, 95).unwrap()).unwrap();
        assert_eq!((j.width, j.height), (40, 30));
        let err: f64 = j
            .pixels
            .iter()
            .zip(&img.pixels)
            .map(|(a, b)| (f64::from(*a) - f64::from(*b)).abs())
            .sum::<f64>()
            / img.pixels.len() as f64;
        assert!(err < 6.0, "mean JPEG error {err}");
        assert!(decode(b"GIF89a....").is_err());
        let mut broken = encode_jpeg(&img, 90).unwrap();
        broken.truncate(broken.len() / 3);
        broken.extend_from_slice(&[0u8; 16]);
        // A truncated JPEG either fails or decodes garbage; it must not panic.
        let _ = decode(&broken);
        assert!(decode(&encode_png(&img).unwrap()[..50]).is_err());
    }

    #[test]
    fn crops_stay_inside_and_are_seeded() {
        for (w, h) in [(512, 384), (100, 1000), (224, 224), (3, 2)] {
            for i in 0..50 {
                let c = random_resized_crop(w, h, &mut Rng::new(1, 2, i));
                assert!(c.left >= 0.0 && c.top >= 0.0, "{c:?}");
                assert!(c.left + c.width <= f64::from(w) + 1e-9, "{c:?}");
                assert!(c.top + c.height <= f64::from(h) + 1e-9, "{c:?}");
                assert_eq!(c, random_resized_crop(w, h, &mut Rng::new(1, 2, i)));
            }
        }
        let c = center_crop(512, 384);
        assert_eq!(
            (c.left, c.top, c.width, c.height),
            (64.0, 0.0, 384.0, 384.0)
        );
    }

    #[test]
    fn normalisation_is_clips() {
        let mut out = vec![0f32; 3];
        normalize(&[255, 0, 123], 1, &mut out);
        assert!((out[0] - (1.0 - CLIP_MEAN[0]) / CLIP_STD[0]).abs() < 1e-5);
        assert!((out[1] + CLIP_MEAN[1] / CLIP_STD[1]).abs() < 1e-5);
        let img = test_pattern(64, 48, 3);
        let mut r = fr::Resizer::new();
        let mut out = vec![0f32; 3 * 16 * 16];
        crop_resize_normalize(&mut r, &img, center_crop(64, 48), 16, &mut out).unwrap();
        assert!(out.iter().all(|v| v.is_finite() && v.abs() < 3.0));
    }

    #[test]
    fn the_normalisation_tables_are_the_formula_bit_for_bit() {
        let n = Normalizer::clip();
        // Every byte value in every channel, then a picture.
        let all: Vec<u8> = (0..=255u8).flat_map(|v| [v, v, v]).collect();
        let mut want = vec![0f32; all.len()];
        normalize(&all, 16, &mut want);
        let got = n.to_chw(&all);
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        let img = noisy_pattern(24, 24, 5);
        let mut want = vec![0f32; img.pixels.len()];
        normalize(&img.pixels, 24, &mut want);
        assert_eq!(n.to_chw(&img.pixels), want);
    }

    #[test]
    fn decoding_into_a_reused_buffer_gives_what_a_fresh_decode_gives() {
        let mut img = Rgb {
            width: 0,
            height: 0,
            pixels: Vec::new(),
        };
        // Larger, smaller, other formats, a failure, then again: each as decoded alone.
        let pics = [(64, 48, 1), (20, 30, 2), (80, 60, 3), (7, 5, 4)];
        for (i, &(w, h, seed)) in pics.iter().chain(pics.iter()).enumerate() {
            let p = noisy_pattern(w, h, seed);
            let bytes = match i % 3 {
                0 => encode_jpeg(&p, 90).unwrap(),
                1 => encode_png(&p).unwrap(),
                _ => encode_webp(&p).unwrap(),
            };
            decode_into(&bytes, &mut img).unwrap();
            assert_eq!(img, decode(&bytes).unwrap(), "picture {i}");
            assert!(decode_into(&bytes[..bytes.len() / 4], &mut img).is_err() || i % 3 == 0);
            if i % 3 != 0 {
                assert_eq!((img.width, img.height, img.pixels.len()), (0, 0, 0));
            }
        }
    }

    /// `test_pattern` with per-pixel noise (edges and texture for the resampling to get
    /// wrong).
    fn noisy_pattern(w: u32, h: u32, seed: u64) -> Rgb {
        let mut img = test_pattern(w, h, seed);
        let mut r = Rng::new(seed, 11, 0);
        for p in img.pixels.iter_mut() {
            *p = p.saturating_add(r.below(64) as u8).saturating_sub(32);
        }
        img
    }

    /// PIL's bicubic kernel (a = −0.5), `BICUBIC` in `Resample.c`.
    fn bicubic(x: f64) -> f64 {
        let (a, x) = (-0.5, x.abs());
        if x < 1.0 {
            ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * a
        } else {
            0.0
        }
    }

    /// PIL's `precompute_coeffs` in f64: for each output position, the first input index
    /// and the normalised weights, the kernel widened by the scale when shrinking.
    fn pil_weights(in_size: usize, in0: f64, in1: f64, out: usize) -> Vec<(usize, Vec<f64>)> {
        let scale = (in1 - in0) / out as f64;
        let filterscale = scale.max(1.0);
        let support = 2.0 * filterscale;
        (0..out)
            .map(|o| {
                let center = in0 + (o as f64 + 0.5) * scale;
                let lo = ((center - support + 0.5) as i64).max(0) as usize;
                let hi = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
                let w: Vec<f64> = (lo..hi)
                    .map(|x| bicubic((x as f64 - center + 0.5) / filterscale))
                    .collect();
                let sum: f64 = w.iter().sum();
                (lo, w.iter().map(|v| v / sum).collect())
            })
            .collect()
    }

    /// PIL's `Image.resize(size, BICUBIC, box)` (what torchvision's `resized_crop` does on
    /// PIL images): horizontal pass, 8-bit intermediate, vertical pass, with f64 weights.
    fn pil_reference(img: &Rgb, c: Crop, size: usize) -> Vec<f64> {
        let (w, h) = (img.width as usize, img.height as usize);
        let hx = pil_weights(w, c.left, c.left + c.width, size);
        let vy = pil_weights(h, c.top, c.top + c.height, size);
        let mut rows = vec![0f64; h * size * 3];
        for y in 0..h {
            for (o, (lo, ws)) in hx.iter().enumerate() {
                for ch in 0..3 {
                    let v: f64 = ws
                        .iter()
                        .enumerate()
                        .map(|(k, wt)| wt * f64::from(img.pixels[(y * w + lo + k) * 3 + ch]))
                        .sum();
                    // PIL's intermediate image is 8-bit: the overshoot of the kernel's
                    // negative lobes is clipped after the first pass.
                    rows[(y * size + o) * 3 + ch] = v.round().clamp(0.0, 255.0);
                }
            }
        }
        let mut out = vec![0f64; size * size * 3];
        for (o, (lo, ws)) in vy.iter().enumerate() {
            for x in 0..size * 3 {
                out[o * size * 3 + x] = ws
                    .iter()
                    .enumerate()
                    .map(|(k, wt)| wt * rows[(lo + k) * size * 3 + x])
                    .sum();
            }
        }
        out
    }

    #[test]
    fn crops_resample_as_pils_bicubic() {
        // Shrinking about 2× (the bench's 512×384 → 224), a little, not at all, enlarging,
        // and random-resized crops, against PIL's algorithm with exact weights. Tolerance:
        // fast_image_resize, like PIL, weighs in fixed point (PIL with 22 fractional bits,
        // fast_image_resize with fewer), so a value that lands within a hair of .5 may round
        // the other way: one level, rarely (a mean of a hundredth). A wrong kernel, support,
        // crop offset or order of passes is off by several levels on these noisy edges.
        let mut r = fr::Resizer::new();
        let cases: Vec<(u32, u32, usize, Option<u64>)> = vec![
            (512, 384, 224, None),
            (300, 260, 224, None),
            (224, 224, 224, None),
            (100, 70, 224, None),
            (512, 384, 224, Some(1)),
            (384, 512, 96, Some(2)),
            (200, 150, 64, Some(3)),
        ];
        for (w, h, size, rrc) in cases {
            let img = noisy_pattern(w, h, u64::from(w + h));
            let crop = match rrc {
                Some(seed) => random_resized_crop(w, h, &mut Rng::new(seed, 2, 3)),
                None => center_crop(w, h),
            };
            let mut got = vec![0u8; size * size * 3];
            crop_resize(&mut r, &img, crop, size, &mut got).unwrap();
            let want = pil_reference(&img, crop, size);
            let diffs: Vec<f64> = got
                .iter()
                .zip(&want)
                .map(|(&g, &x)| (f64::from(g) - x.round().clamp(0.0, 255.0)).abs())
                .collect();
            let max = diffs.iter().copied().fold(0.0, f64::max);
            let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
            assert!(
                max <= 1.0 && mean <= 0.01,
                "{w}×{h} {crop:?} → {size}: max |Δ| {max}, mean {mean}"
            );
        }
    }
}
