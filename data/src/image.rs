//! Images: decoding (JPEG through zune-jpeg, PNG through `png`, WebP through `image-webp`;
//! the format sniffed from the bytes, as PIL does), the crops (shorter side then centre crop
//! for evaluation, random-resized crop for training, both resampled once with a bicubic
//! filter by fast_image_resize), and CLIP's normalisation into a channel-major `f32` buffer.
//! Encoders (JPEG, PNG, lossless WebP) for `weaver data pack` and for tests.

use std::io::Cursor;

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
    match sniff(bytes) {
        Some(Format::Jpeg) => decode_jpeg(bytes),
        Some(Format::Png) => decode_png(bytes),
        Some(Format::Webp) => decode_webp(bytes),
        None => Err(format!(
            "not a JPEG, PNG or WebP image (starts with {:02x?})",
            &bytes[..bytes.len().min(4)]
        )),
    }
}

fn decode_jpeg(bytes: &[u8]) -> Result<Rgb, String> {
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
    let pixels = d.decode().map_err(|e| format!("JPEG: {e:?}"))?;
    if pixels.len() != w as usize * h as usize * 3 {
        return Err(format!(
            "JPEG: decoded {} bytes for {w}×{h} RGB",
            pixels.len()
        ));
    }
    Ok(Rgb {
        width: w,
        height: h,
        pixels,
    })
}

fn to_rgb(raw: &[u8], channels: usize, w: u32, h: u32) -> Result<Rgb, String> {
    let n = w as usize * h as usize;
    if raw.len() < n * channels {
        return Err(format!("{} bytes for {w}×{h}×{channels}", raw.len()));
    }
    let pixels = match channels {
        3 => raw[..n * 3].to_vec(),
        4 => raw[..n * 4]
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        1 => raw[..n].iter().flat_map(|&g| [g, g, g]).collect(),
        2 => raw[..n * 2]
            .chunks_exact(2)
            .flat_map(|p| [p[0], p[0], p[0]])
            .collect(),
        c => return Err(format!("{c} channels")),
    };
    Ok(Rgb {
        width: w,
        height: h,
        pixels,
    })
}

fn decode_png(bytes: &[u8]) -> Result<Rgb, String> {
    let mut d = png::Decoder::new(Cursor::new(bytes));
    d.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut r = d.read_info().map_err(|e| format!("PNG: {e}"))?;
    let (w, h) = (r.info().width, r.info().height);
    check_size(w, h)?;
    let size = r.output_buffer_size().ok_or("PNG: image too large")?;
    let mut buf = vec![0u8; size];
    let out = r.next_frame(&mut buf).map_err(|e| format!("PNG: {e}"))?;
    let channels = out.color_type.samples();
    to_rgb(&buf[..out.buffer_size()], channels, out.width, out.height)
}

fn decode_webp(bytes: &[u8]) -> Result<Rgb, String> {
    let mut d =
        image_webp::WebPDecoder::new(Cursor::new(bytes)).map_err(|e| format!("WebP: {e}"))?;
    let (w, h) = d.dimensions();
    check_size(w, h)?;
    let size = d.output_buffer_size().ok_or("WebP: image too large")?;
    let mut buf = vec![0u8; size];
    d.read_image(&mut buf).map_err(|e| format!("WebP: {e}"))?;
    to_rgb(&buf, if d.has_alpha() { 4 } else { 3 }, w, h)
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
    let src = fr::images::ImageRef::new(img.width, img.height, &img.pixels, fr::PixelType::U8x3)
        .map_err(|e| format!("resize: {e}"))?;
    let mut dst = fr::images::Image::new(size as u32, size as u32, fr::PixelType::U8x3);
    let opts = fr::ResizeOptions::new()
        .crop(crop.left, crop.top, crop.width, crop.height)
        .resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::CatmullRom));
    resizer
        .resize(&src, &mut dst, &opts)
        .map_err(|e| format!("resize: {e}"))?;
    normalize(dst.buffer(), size, out);
    Ok(())
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
}
