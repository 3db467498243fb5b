//! Compressed clusters: raw deflate (QEMU's "zlib", 4 KiB window, no header) and zstd frames.

use super::header::CompressionType;

/// Inflates `input` into all of `out`; trailing bytes after the stream are ignored, since the
/// stored length is rounded up to whole sectors.
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    match kind {
        CompressionType::Zlib => inflate(input, out),
        CompressionType::Zstd => unzstd(input, out),
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    let mut d = flate2::Decompress::new(false);
    let r = d.decompress(input, out, flate2::FlushDecompress::Finish);
    match r {
        Ok(_) if d.total_out() == out.len() as u64 => Ok(()),
        Ok(_) => Err(format!(
            "inflated to {} bytes instead of {}",
            d.total_out(),
            out.len()
        )),
        Err(e) => Err(e.to_string()),
    }
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let mut d = Decoder::new().map_err(|e| e.to_string())?;
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    loop {
        let hint = d.run(&mut inb, &mut outb).map_err(|e| e.to_string())?;
        if outb.pos() == outb.capacity() {
            return Ok(());
        }
        if hint == 0 || inb.pos() == input.len() {
            return Err(format!("zstd frame ended after {} bytes", outb.pos()));
        }
    }
}

/// Compresses one cluster; `None` when compression does not save space (QEMU then writes the
/// cluster uncompressed).
pub fn compress(kind: CompressionType, input: &[u8]) -> Option<Vec<u8>> {
    let out = match kind {
        CompressionType::Zlib => deflate(input)?,
        CompressionType::Zstd => zstd::bulk::compress(input, 0).ok()?,
    };
    (out.len() < input.len()).then_some(out)
}

fn deflate(input: &[u8]) -> Option<Vec<u8>> {
    // QEMU inflates with a 4 KiB window (windowBits -12), so compress with the same window.
    let mut c = flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12);
    let mut out = Vec::with_capacity(input.len());
    let r = c
        .compress_vec(input, &mut out, flate2::FlushCompress::Finish)
        .ok()?;
    (r == flate2::Status::StreamEnd).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_both_kinds_and_ignores_trailing_bytes() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 300) as u8).collect();
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let mut c = compress(kind, &data).unwrap();
            c.extend_from_slice(&[0xa5; 300]);
            let mut out = vec![0u8; data.len()];
            decompress(kind, &c, &mut out).unwrap();
            assert_eq!(out, data);
        }
    }

    #[test]
    fn garbage_is_an_error() {
        let mut out = vec![0u8; 4096];
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            assert!(decompress(kind, &[0xff; 64], &mut out).is_err());
        }
    }
}

#[cfg(test)]
mod text_tests {
    use super::*;

    #[test]
    fn base64_text_compresses() {
        let mut rng = fastrand::Rng::with_seed(1);
        const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let data: Vec<u8> = (0..65536).map(|_| B64[rng.usize(..64)]).collect();
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let c = compress(kind, &data).expect("text compresses");
            assert!(c.len() < data.len() * 4 / 5, "{kind:?}: {}", c.len());
            let mut out = vec![0u8; data.len()];
            decompress(kind, &c, &mut out).unwrap();
            assert_eq!(out, data);
        }
    }
}
