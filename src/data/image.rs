//! Image files: decoding PNG and JPEG photos to 8-bit RGB, PNG label maps to their raw values,
//! and writing PNG (colourised predictions, test fixtures).
//!
//! The format is told by the file's signature, not its extension. Photos of any PNG colour type
//! (grey, grey + alpha, RGB, RGBA, palette; 1–16 bits) become RGB8 (alpha dropped, 16-bit
//! samples rounded down to their high byte as libpng's `strip_16` does); JPEGs (baseline or
//! progressive, grey or colour) are decoded by `zune-jpeg` in strict mode. Label maps must be
//! single-channel PNGs — greyscale of any bit depth, or palette, whose raw *indices* are the
//! labels (as PIL reads a `P`-mode image): JPEG is lossy and cannot hold labels.
//!
//! Every failure is [`Error::Data`] naming the file. A PNG is read to its end chunk (with its
//! CRCs checked), so a truncated or corrupted file is an error rather than a partial image; a
//! JPEG must end with its end-of-image marker.

use std::io::{BufWriter, Cursor};
use std::path::Path;

use crate::error::{Error, Result};

/// An 8-bit RGB image, row-major, `[height, width, 3]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `height · width · 3` bytes.
    pub data: Vec<u8>,
}

/// A single-channel label map as stored in its file, row-major `[height, width]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawLabels {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// One value per pixel (grey level or palette index; up to 65535 for 16-bit files).
    pub data: Vec<u16>,
}

/// The largest side we decode: a corrupt header cannot make us allocate gigabytes.
pub const MAX_SIDE: usize = 16384;

pub(crate) fn data_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Data { path: path.display().to_string(), message: message.into() }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => data_err(path, "no such file"),
        _ => data_err(path, format!("cannot read: {e}")),
    })
}

const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";

fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF])
}

/// Decodes a PNG or JPEG photo to RGB8.
pub fn decode_image(path: &Path) -> Result<RgbImage> {
    let bytes = read(path)?;
    decode_image_bytes(&bytes, path)
}

/// [`decode_image`] on bytes already read; `path` names them in errors.
pub fn decode_image_bytes(bytes: &[u8], path: &Path) -> Result<RgbImage> {
    if bytes.starts_with(PNG_MAGIC) {
        decode_png_rgb(bytes, path)
    } else if is_jpeg(bytes) {
        decode_jpeg(bytes, path)
    } else if bytes.is_empty() {
        Err(data_err(path, "empty file"))
    } else {
        Err(data_err(path, "neither a PNG nor a JPEG file (unknown signature)"))
    }
}

/// Decodes a single-channel PNG label map to its raw values.
pub fn decode_labels(path: &Path) -> Result<RawLabels> {
    let bytes = read(path)?;
    decode_labels_bytes(&bytes, path)
}

/// [`decode_labels`] on bytes already read; `path` names them in errors.
pub fn decode_labels_bytes(bytes: &[u8], path: &Path) -> Result<RawLabels> {
    if is_jpeg(bytes) {
        return Err(data_err(path, "a label map must be a PNG: JPEG is lossy and cannot hold labels"));
    }
    if !bytes.starts_with(PNG_MAGIC) {
        return Err(data_err(path, "not a PNG file"));
    }
    let (info, raw) = decode_png(bytes, path, png::Transformations::IDENTITY)?;
    let (w, h) = (info.width, info.height);
    let bits = info.bit_depth as usize;
    match info.color_type {
        png::ColorType::Grayscale | png::ColorType::Indexed => {}
        other => {
            return Err(data_err(
                path,
                format!("a label map must be single-channel (greyscale or palette), this PNG is {other:?}"),
            ))
        }
    }
    let stride = (w * bits).div_ceil(8);
    let mut data = Vec::with_capacity(w * h);
    for row in raw.chunks_exact(stride).take(h) {
        match bits {
            8 => data.extend(row[..w].iter().map(|&v| v as u16)),
            16 => data.extend(row[..2 * w].chunks_exact(2).map(|b| u16::from_be_bytes([b[0], b[1]]))),
            1 | 2 | 4 => {
                let per_byte = 8 / bits;
                let mask = (1u16 << bits) - 1;
                data.extend((0..w).map(|x| {
                    let byte = row[x / per_byte] as u16;
                    let shift = 8 - bits * (x % per_byte + 1);
                    (byte >> shift) & mask
                }));
            }
            _ => return Err(data_err(path, format!("unsupported bit depth {bits}"))),
        }
    }
    Ok(RawLabels { width: w, height: h, data })
}

struct PngInfo {
    width: usize,
    height: usize,
    color_type: png::ColorType,
    bit_depth: png::BitDepth,
}

/// Decodes the first frame with `transform` and reads the file to its end (checking every
/// CRC), so truncation anywhere is an error.
fn decode_png(bytes: &[u8], path: &Path, transform: png::Transformations) -> Result<(PngInfo, Vec<u8>)> {
    let mut decoder = png::Decoder::new(Cursor::new(bytes));
    decoder.set_transformations(transform);
    let bad = |e: png::DecodingError| data_err(path, format!("corrupt or truncated PNG: {e}"));
    let mut reader = decoder.read_info().map_err(bad)?;
    let (w, h) = (reader.info().width as usize, reader.info().height as usize);
    if w == 0 || h == 0 || w > MAX_SIDE || h > MAX_SIDE {
        return Err(data_err(path, format!("image size {w}×{h} is outside 1..={MAX_SIDE}")));
    }
    let size = reader.output_buffer_size().ok_or_else(|| data_err(path, "image too large"))?;
    let mut buf = vec![0; size];
    let frame = reader.next_frame(&mut buf).map_err(bad)?;
    buf.truncate(frame.buffer_size());
    reader.finish().map_err(bad)?;
    let (color_type, bit_depth) = reader.output_color_type();
    Ok((PngInfo { width: w, height: h, color_type, bit_depth }, buf))
}

fn decode_png_rgb(bytes: &[u8], path: &Path) -> Result<RgbImage> {
    let (info, buf) = decode_png(bytes, path, png::Transformations::normalize_to_color8())?;
    let (w, h) = (info.width, info.height);
    let channels = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => return Err(data_err(path, "palette was not expanded")),
    };
    if info.bit_depth != png::BitDepth::Eight || buf.len() < w * h * channels {
        return Err(data_err(path, "unexpected decoded layout"));
    }
    let data = match channels {
        3 => buf[..w * h * 3].to_vec(),
        c => {
            buf[..w * h * c].chunks_exact(c).flat_map(|p| if c <= 2 { [p[0]; 3] } else { [p[0], p[1], p[2]] }).collect()
        }
    };
    Ok(RgbImage { width: w, height: h, data })
}

fn decode_jpeg(bytes: &[u8], path: &Path) -> Result<RgbImage> {
    use zune_core::bytestream::ZCursor;
    use zune_core::colorspace::ColorSpace;
    use zune_core::options::DecoderOptions;
    // The decoder is lenient with a missing tail (it pads the scan); a complete file ends with
    // the end-of-image marker (possibly followed by padding, which some writers append).
    let tail = &bytes[bytes.len().saturating_sub(64)..];
    if !tail.windows(2).any(|w| w == [0xFF, 0xD9]) {
        return Err(data_err(path, "truncated JPEG: no end-of-image marker"));
    }
    let options = DecoderOptions::default()
        .set_strict_mode(true)
        .set_max_width(MAX_SIDE)
        .set_max_height(MAX_SIDE)
        .jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    let data = decoder.decode().map_err(|e| data_err(path, format!("corrupt or truncated JPEG: {e:?}")))?;
    let info = decoder.info().ok_or_else(|| data_err(path, "JPEG without a frame header"))?;
    let (w, h) = (info.width as usize, info.height as usize);
    if w == 0 || h == 0 || data.len() != w * h * 3 {
        return Err(data_err(path, format!("decoded {} bytes for a {w}×{h} RGB image", data.len())));
    }
    Ok(RgbImage { width: w, height: h, data })
}

fn write_png(path: &Path, width: usize, height: usize, color: png::ColorType, data: &[u8]) -> Result<()> {
    let channels = if color == png::ColorType::Rgb { 3 } else { 1 };
    if width == 0 || height == 0 || data.len() != width * height * channels {
        return Err(data_err(path, format!("{} bytes do not make a {width}×{height} image", data.len())));
    }
    let err = |e: String| data_err(path, format!("cannot write PNG: {e}"));
    let file = std::fs::File::create(path).map_err(|e| err(e.to_string()))?;
    let mut enc = png::Encoder::new(BufWriter::new(file), width as u32, height as u32);
    enc.set_color(color);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().map_err(|e| err(e.to_string()))?;
    w.write_image_data(data).map_err(|e| err(e.to_string()))?;
    w.finish().map_err(|e| err(e.to_string()))
}

/// Writes an RGB8 image as a PNG file.
pub fn write_png_rgb(path: &Path, image: &RgbImage) -> Result<()> {
    write_png(path, image.width, image.height, png::ColorType::Rgb, &image.data)
}

/// Writes 8-bit single-channel values (a label map) as a greyscale PNG file.
pub fn write_png_gray(path: &Path, width: usize, height: usize, data: &[u8]) -> Result<()> {
    write_png(path, width, height, png::ColorType::Grayscale, data)
}
