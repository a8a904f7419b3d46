//! What a stream decodes to, measured within a bound before anything decodes it whole.
//!
//! Every stage of a stream's filter chain is decoded here with its output bounded, so a bomb
//! costs at most the bound however it is built: one Flate layer (1 000:1), Flate inside Flate
//! (a million to one), LZW (up to about 2 700:1), run-length (64:1), ASCII85 (`z`, 4:1).
//! The last stage is only counted; a middle stage is held, within the bound, to feed the next.
//!
//! Two callers: [`super::inflated`], after loading, for the streams reading needs; and
//! [`load_guard`], during lopdf's load, for the object streams that lopdf inflates while it
//! loads, before anything else could look at them.

use std::borrow::Cow;
use std::io::Write;

use lopdf::{Dictionary, Object, Stream};

/// Bytes `stream` decodes to through its whole filter chain, counted up to `bound + 1` (more
/// than `bound` means over). `Err` carries what was counted before a filter failed. A filter
/// no stage here knows ends the measure with the bytes it was given (what lopdf would keep).
pub fn decoded_len(stream: &Stream, bound: u64) -> Result<u64, u64> {
    let filters = match stream.dict.get(b"Filter") {
        Ok(Object::Name(name)) => vec![name.as_slice()],
        Ok(Object::Array(names)) => names.iter().filter_map(|n| n.as_name().ok()).collect(),
        _ => vec![],
    };
    let limit = bound.saturating_add(1);
    let mut data = Cow::Borrowed(stream.content.as_slice());
    for (stage, filter) in filters.iter().enumerate() {
        let last = stage + 1 == filters.len();
        let mut out = Bounded::new(limit, !last);
        let complete = match *filter {
            b"FlateDecode" | b"Fl" => inflate(&data, &mut out),
            b"LZWDecode" | b"LZW" => lzw(&data, params(&stream.dict, stage), &mut out),
            b"ASCII85Decode" | b"A85" => ascii85(&data, &mut out),
            b"ASCIIHexDecode" | b"AHx" => ascii_hex(&data, &mut out),
            b"RunLengthDecode" | b"RL" => run_length(&data, &mut out),
            _ => return Ok(data.len() as u64),
        };
        if out.count > bound {
            return Ok(out.count);
        }
        if !complete {
            return Err(out.count);
        }
        if last {
            return Ok(out.count);
        }
        data = Cow::Owned(out.kept);
    }
    Ok(data.len() as u64)
}

/// The `DecodeParms` of filter number `stage`.
fn params(dict: &Dictionary, stage: usize) -> Option<&Dictionary> {
    match dict.get(b"DecodeParms").ok()? {
        Object::Dictionary(d) => Some(d),
        Object::Array(items) => items.get(stage)?.as_dict().ok(),
        _ => None,
    }
}

/// A sink that counts what it is given up to `limit`, keeping it when asked, and refuses more.
struct Bounded {
    count: u64,
    limit: u64,
    keep: bool,
    kept: Vec<u8>,
}

impl Bounded {
    fn new(limit: u64, keep: bool) -> Bounded {
        Bounded {
            count: 0,
            limit,
            keep,
            kept: Vec::new(),
        }
    }

    fn over(&self) -> bool {
        self.count >= self.limit
    }
}

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let room = usize::try_from(self.limit - self.count).unwrap_or(usize::MAX);
        let take = buf.len().min(room);
        if take == 0 && !buf.is_empty() {
            return Err(std::io::Error::other("bound reached"));
        }
        self.count += take as u64;
        if self.keep {
            self.kept.extend_from_slice(&buf[..take]);
        }
        Ok(take)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Zlib, or raw deflate after the two header bytes when zlib yields nothing (lopdf's own
/// fallback). Whether the data inflated to its end (or to the bound).
fn inflate(data: &[u8], out: &mut Bounded) -> bool {
    let zlib = std::io::copy(&mut flate2::read::ZlibDecoder::new(data), out);
    if zlib.is_ok() || out.over() {
        return true;
    }
    if out.count == 0 && data.len() > 2 {
        let raw = std::io::copy(&mut flate2::read::DeflateDecoder::new(&data[2..]), out);
        return raw.is_ok() || out.over();
    }
    false
}

/// LZW as lopdf reads it: most significant bit first, 8-bit symbols, `EarlyChange` 1 unless
/// the parameters say 0.
fn lzw(data: &[u8], params: Option<&Dictionary>, out: &mut Bounded) -> bool {
    use weezl::{BitOrder, decode::Decoder};
    let early_change = params
        .and_then(|p| p.get(b"EarlyChange").ok())
        .and_then(|v| v.as_i64().ok())
        .is_none_or(|v| v != 0);
    let mut decoder = if early_change {
        Decoder::with_tiff_size_switch(BitOrder::Msb, 8)
    } else {
        Decoder::new(BitOrder::Msb, 8)
    };
    // weezl's stream buffer defaults to 16 MiB, allocated for each stream: a 47-byte thumbnail
    // took milliseconds. 64 KiB is plenty to pass on to a counting sink.
    let mut stream = decoder.into_stream(&mut *out);
    stream.set_buffer_size(64 * 1024);
    // lopdf keeps what decoded before an error, so a damaged tail is not a failure here.
    let _ = stream.decode_all(data);
    true
}

/// ASCII85: at most four bytes out per byte in (`z`).
fn ascii85(data: &[u8], out: &mut Bounded) -> bool {
    let end = memchr::memmem::find(data, b"~>").unwrap_or(data.len());
    let mut group = [0u8; 5];
    let mut filled = 0;
    for &byte in &data[..end] {
        match byte {
            b'z' if filled == 0 => {
                if out.write_all(&[0; 4]).is_err() {
                    return true;
                }
            }
            b'!'..=b'u' => {
                group[filled] = byte - b'!';
                filled += 1;
                if filled == 5 {
                    let value = group.iter().fold(0u64, |v, d| v * 85 + u64::from(*d));
                    let Ok(value) = u32::try_from(value) else {
                        return false;
                    };
                    if out.write_all(&value.to_be_bytes()).is_err() {
                        return true;
                    }
                    filled = 0;
                }
            }
            b if b.is_ascii_whitespace() => {}
            _ => return false,
        }
    }
    if filled > 1 {
        group[filled..].fill(84);
        let value = group.iter().fold(0u64, |v, d| v * 85 + u64::from(*d));
        let bytes = u32::try_from(value).unwrap_or(u32::MAX).to_be_bytes();
        let _ = out.write_all(&bytes[..filled - 1]);
    }
    true
}

/// ASCIIHex: one byte out per two digits in.
fn ascii_hex(data: &[u8], out: &mut Bounded) -> bool {
    let digits: Vec<u8> = data
        .iter()
        .take_while(|b| **b != b'>')
        .filter(|b| !b.is_ascii_whitespace())
        .map(|b| (*b as char).to_digit(16).map(|d| d as u8))
        .collect::<Option<_>>()
        .unwrap_or_default();
    let bytes: Vec<u8> = digits
        .chunks(2)
        .map(|pair| pair[0] << 4 | pair.get(1).copied().unwrap_or(0))
        .collect();
    let _ = out.write_all(&bytes);
    true
}

/// Run-length: a length byte, then that many literal bytes (0–127) or one byte repeated
/// 257 − length times (129–255); 128 ends the data.
fn run_length(data: &[u8], out: &mut Bounded) -> bool {
    let mut i = 0;
    while let Some(&length) = data.get(i) {
        let written = match length {
            128 => return true,
            0..=127 => {
                let run = &data[(i + 1).min(data.len())..(i + 2 + length as usize).min(data.len())];
                i += 2 + length as usize;
                out.write_all(run)
            }
            _ => {
                let Some(&byte) = data.get(i + 1) else {
                    return false;
                };
                i += 2;
                out.write_all(&vec![byte; 257 - length as usize])
            }
        };
        if written.is_err() {
            return true;
        }
    }
    true
}

/// A bound on what lopdf inflates while it loads. lopdf decodes every object stream as it
/// loads a file, with no limit, before anything here can look at the document; its load
/// filter is the one place that sees an object stream first. The filter measures each object
/// stream against what is left of the cap and empties the one that goes over (so lopdf
/// inflates nothing of it), and the load then reports that it went over.
///
/// The filter is a plain function, so its state is process-wide; one load at a time holds it.
/// (The parser runs in a child process that opens one document; the lock matters in tests.)
pub mod load_guard {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use lopdf::{Document, LoadOptions, Object, ObjectId};

    static ONE_LOAD_AT_A_TIME: parking_lot::Mutex<()> = parking_lot::const_mutex(());
    /// Bytes the object streams may still inflate to.
    static LEFT: AtomicU64 = AtomicU64::new(0);
    static OVER: AtomicBool = AtomicBool::new(false);

    /// lopdf's load of `bytes`, with its object streams inflating to `cap` bytes at most in
    /// all. `Ok(None)` when they would have inflated to more.
    pub fn load(bytes: &[u8], cap: u64) -> lopdf::Result<Option<Document>> {
        let _held = ONE_LOAD_AT_A_TIME.lock();
        LEFT.store(cap, Ordering::SeqCst);
        OVER.store(false, Ordering::SeqCst);
        let options = LoadOptions {
            filter: Some(guard),
            ..LoadOptions::default()
        };
        let doc = Document::load_mem_with_options(bytes, options)?;
        Ok((!OVER.load(Ordering::SeqCst)).then_some(doc))
    }

    /// lopdf calls this for each object it loads, top-level objects (whose return value it
    /// ignores: it keeps the object, as changed here) and objects inside object streams (whose
    /// return value it keeps; those are never streams).
    fn guard(id: ObjectId, object: &mut Object) -> Option<(ObjectId, Object)> {
        let Object::Stream(stream) = object else {
            return Some((id, object.clone()));
        };
        if stream.dict.has_type(b"ObjStm") {
            let left = LEFT.load(Ordering::SeqCst);
            let measured = super::decoded_len(stream, left).unwrap_or_else(|partly| partly);
            if measured > left
                || LEFT
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| {
                        l.checked_sub(measured)
                    })
                    .is_err()
            {
                OVER.store(true, Ordering::SeqCst);
                stream.set_content(Vec::new());
            }
        }
        Some((id, Object::Null))
    }
}

#[cfg(test)]
mod tests {
    use lopdf::dictionary;

    use super::*;

    fn stream(filters: &[&str], content: Vec<u8>) -> Stream {
        let filters: Vec<Object> = filters
            .iter()
            .map(|f| Object::Name(f.as_bytes().to_vec()))
            .collect();
        Stream::new(dictionary! {"Filter" => filters}, content).with_compression(false)
    }

    fn deflate(data: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn every_stage_of_a_chain_is_measured() {
        let plain = vec![b'x'; 1_000_000];
        let once = deflate(&plain);
        let twice = deflate(&once);
        assert_eq!(
            decoded_len(&stream(&["FlateDecode"], once.clone()), u64::MAX),
            Ok(1_000_000)
        );
        // Flate inside Flate: the inner layer counts, not the outer.
        let both = stream(&["FlateDecode", "FlateDecode"], twice);
        assert_eq!(decoded_len(&both, u64::MAX), Ok(1_000_000));
        assert_eq!(
            decoded_len(&both, 10_000),
            Ok(10_001),
            "stops just past the bound"
        );
        // ASCIIHex then Flate.
        let hex: String = once.iter().map(|b| format!("{b:02x}")).collect();
        let hexed = stream(
            &["ASCIIHexDecode", "FlateDecode"],
            format!("{hex}>").into_bytes(),
        );
        assert_eq!(decoded_len(&hexed, u64::MAX), Ok(1_000_000));
    }

    #[test]
    fn lzw_run_length_and_ascii85_are_measured() {
        let plain = vec![7u8; 300_000];
        let mut encoder = weezl::encode::Encoder::with_tiff_size_switch(weezl::BitOrder::Msb, 8);
        let lzw = encoder.encode(&plain).unwrap();
        assert!(lzw.len() < 10_000, "LZW amplifies: {} bytes", lzw.len());
        assert_eq!(
            decoded_len(&stream(&["LZWDecode"], lzw.clone()), u64::MAX),
            Ok(300_000)
        );
        assert_eq!(decoded_len(&stream(&["LZWDecode"], lzw), 1_000), Ok(1_001));
        // 2 bytes: a run of 128 copies; 128 ends the data.
        let runs = [129u8, 7].repeat(100).into_iter().chain([128]).collect();
        assert_eq!(
            decoded_len(&stream(&["RunLengthDecode"], runs), u64::MAX),
            Ok(12_800)
        );
        // Two `z` groups, then text: as long as lopdf's own decoding.
        let a85 = stream(&["ASCII85Decode"], b"zz87cURD]i,\"Ebo80~>".to_vec());
        let lopdf_len = a85.decompressed_content().unwrap().len() as u64;
        assert_eq!(decoded_len(&a85, u64::MAX), Ok(lopdf_len));
        assert!(lopdf_len > 8, "{lopdf_len}");
    }

    #[test]
    fn a_damaged_stream_reports_what_it_decoded_and_an_unknown_filter_its_bytes() {
        let mut broken = deflate(&vec![b'y'; 100_000]);
        let half = broken.len() / 2;
        broken.truncate(half);
        assert!(decoded_len(&stream(&["FlateDecode"], broken), u64::MAX).is_err());
        assert_eq!(
            decoded_len(&stream(&["JBIG2Decode"], vec![0; 42]), 10),
            Ok(42)
        );
        assert_eq!(decoded_len(&stream(&[], vec![0; 42]), 10), Ok(42));
    }
}
