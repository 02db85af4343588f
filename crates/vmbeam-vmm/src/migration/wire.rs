//! The wire protocol of host-to-host migration over TCP.
//!
//! A stream of frames, each `magic | version | kind | length | crc32 |
//! payload`. Every frame is length-checked against [`MAX_PAYLOAD`] before
//! anything is allocated and CRC-checked before it is used, so a truncated
//! or corrupted stream is rejected with an error that says where, and the
//! receiver never acts on half a frame. Structured frames carry JSON;
//! memory frames carry raw pages; runs of zero pages travel as ZERO markers
//! (region, offset, length) instead of bytes. A refusal travels as REFUSE
//! with a bounded reason, so the sender can print the receiver's own words.

use std::io::{Read, Write};

/// `"VBMW"`.
pub const MAGIC: u32 = 0x5642_4d57;
/// Protocol version.
pub const VERSION: u16 = 2;
/// Largest payload of one frame.
pub const MAX_PAYLOAD: usize = 4 << 20;
/// Bytes of memory per PAGES frame at most.
pub const CHUNK: usize = 1 << 20;
/// Longest reason a REFUSE frame carries (longer ones are cut).
pub const MAX_REASON: usize = 512;
/// Header bytes of a frame.
pub const HEADER: usize = 16;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// Sender → receiver: what is coming (JSON: the sender's `Hello`).
    Hello = 1,
    /// Sender → receiver: pages of one region (binary).
    Pages = 2,
    /// Sender → receiver: vCPU and nested state (JSON).
    State = 3,
    /// Sender → receiver: everything was sent.
    Done = 4,
    /// Receiver → sender: verdict (JSON).
    Result = 5,
    /// Sender → receiver: start running it.
    Commit = 6,
    /// Sender → receiver: give up (UTF-8 reason).
    Abort = 7,
    /// Sender → receiver: a run of zero bytes (region u32, offset u64, length u64).
    Zero = 8,
    /// Receiver → sender: the migration is refused (UTF-8 reason, at most
    /// [`MAX_REASON`] bytes).
    Refuse = 9,
    /// Receiver → sender: the vCPUs run on this side now (JSON).
    Started = 10,
    /// Receiver → sender: hashes of pages of a kept image (region u32,
    /// first page u64, 16 bytes per page).
    Hashes = 11,
    /// Receiver → sender: end of the reuse answer (JSON: reused, why, seed).
    HashesEnd = 12,
    /// Sender → receiver: a run the receiver's kept image already holds
    /// (region u32, offset u64, length u64).
    Same = 13,
    /// Receiver → sender, post-copy: a page the destination's guests wait
    /// for (region u32, offset u64, length u64).
    Fetch = 14,
    /// Sender → receiver, post-copy: the answer to a FETCH (as PAGES).
    Fetched = 15,
    /// Sender → receiver, post-copy: every page was sent (JSON: digest).
    PushDone = 16,
    /// Receiver → sender, post-copy: every page arrived (JSON: digest and
    /// counts); the source may release its copy only after this.
    Received = 17,
}

impl Kind {
    fn from_u16(v: u16) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Pages,
            3 => Kind::State,
            4 => Kind::Done,
            5 => Kind::Result,
            6 => Kind::Commit,
            7 => Kind::Abort,
            8 => Kind::Zero,
            9 => Kind::Refuse,
            10 => Kind::Started,
            11 => Kind::Hashes,
            12 => Kind::HashesEnd,
            13 => Kind::Same,
            14 => Kind::Fetch,
            15 => Kind::Fetched,
            16 => Kind::PushDone,
            17 => Kind::Received,
            _ => return None,
        })
    }
}

/// Errors of the wire protocol.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The connection failed or ended early.
    #[error("migration stream {0}")]
    Io(#[from] std::io::Error),
    /// Not a vmbeam migration stream.
    #[error("bad frame magic {0:#x}: not a vmbeam migration stream")]
    Magic(u32),
    /// Another protocol version.
    #[error("migration protocol version {0} is not supported (this side speaks {VERSION})")]
    Version(u16),
    /// Unknown frame kind.
    #[error("unknown frame kind {0}")]
    Kind(u16),
    /// Length over the limit.
    #[error("frame of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLong(usize),
    /// Payload does not match its checksum.
    #[error("frame {kind:?} is corrupted (crc {got:#010x}, expected {want:#010x})")]
    Crc {
        /// Frame kind.
        kind: Kind,
        /// Computed.
        got: u32,
        /// Sent.
        want: u32,
    },
    /// The peer did not answer in time.
    #[error("the peer did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// TLS failed (handshake or record layer).
    #[error("{0}")]
    Tls(String),
    /// The peer speaks TLS and this side does not, or the other way round.
    #[error("the peer {0}")]
    TlsMismatch(&'static str),
    /// A frame's contents are inconsistent.
    #[error("malformed {0}")]
    Malformed(String),
}

/// CRC-32 (IEEE, as in zlib), hardware-accelerated where the CPU has it.
pub fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

/// Encodes one frame's header for `payload`.
pub fn header(kind: Kind, payload: &[u8]) -> Result<[u8; HEADER], WireError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(WireError::TooLong(payload.len()));
    }
    let mut h = [0u8; HEADER];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&VERSION.to_le_bytes());
    h[6..8].copy_from_slice(&(kind as u16).to_le_bytes());
    h[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    h[12..16].copy_from_slice(&crc32(payload).to_le_bytes());
    Ok(h)
}

/// One whole frame (header and payload) as bytes.
pub fn encode(kind: Kind, payload: &[u8]) -> Result<Vec<u8>, WireError> {
    let h = header(kind, payload)?;
    let mut v = Vec::with_capacity(HEADER + payload.len());
    v.extend_from_slice(&h);
    v.extend_from_slice(payload);
    Ok(v)
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<(), WireError> {
    let h = header(kind, payload)?;
    w.write_all(&h)?;
    w.write_all(payload)?;
    Ok(())
}

/// A checked frame header: its kind, payload length (at most
/// [`MAX_PAYLOAD`]) and the CRC the payload must have.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    /// Kind.
    pub kind: Kind,
    /// Payload length.
    pub len: usize,
    /// CRC-32 of the payload.
    pub crc: u32,
}

/// Reads one frame header, checking magic, version, kind and length.
pub fn read_header(r: &mut impl Read) -> Result<Header, WireError> {
    let mut h = [0u8; HEADER];
    r.read_exact(&mut h)?;
    let word = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    let magic = word(0);
    if h[0] == 0x15 && h[1] == 3 {
        return Err(WireError::TlsMismatch(
            "answered with a TLS alert: it requires TLS (use --tls-dir)",
        ));
    }
    if h[0] == 0x16 && h[1] == 3 {
        return Err(WireError::TlsMismatch(
            "started a TLS handshake: it speaks TLS and this side does not (use --tls-dir)",
        ));
    }
    if magic != MAGIC {
        return Err(WireError::Magic(magic));
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let k = u16::from_le_bytes([h[6], h[7]]);
    let kind = Kind::from_u16(k).ok_or(WireError::Kind(k))?;
    let len = word(8) as usize;
    if len > MAX_PAYLOAD {
        return Err(WireError::TooLong(len));
    }
    Ok(Header {
        kind,
        len,
        crc: word(12),
    })
}

/// Checks a payload against its header's CRC.
pub fn check_crc(h: &Header, payload: &[u8]) -> Result<(), WireError> {
    let got = crc32(payload);
    if got != h.crc {
        return Err(WireError::Crc {
            kind: h.kind,
            got,
            want: h.crc,
        });
    }
    Ok(())
}

/// Reads one frame, checking magic, version, kind, length and CRC.
pub fn read_frame(r: &mut impl Read) -> Result<(Kind, Vec<u8>), WireError> {
    let h = read_header(r)?;
    let mut payload = vec![0u8; h.len];
    r.read_exact(&mut payload)?;
    check_crc(&h, &payload)?;
    Ok((h.kind, payload))
}

/// Bytes before the data in a PAGES payload (region u32, offset u64).
pub const PAGES_HEAD: usize = 12;

/// Payload of a PAGES frame: region index, offset, then the bytes.
pub fn pages_payload(region: u32, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(PAGES_HEAD + data.len());
    v.extend_from_slice(&region.to_le_bytes());
    v.extend_from_slice(&offset.to_le_bytes());
    v.extend_from_slice(data);
    v
}

/// A whole PAGES frame (header included), built with one copy of `data`.
pub fn encode_pages(region: u32, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER + PAGES_HEAD + data.len());
    v.extend_from_slice(&[0u8; HEADER]);
    v.extend_from_slice(&region.to_le_bytes());
    v.extend_from_slice(&offset.to_le_bytes());
    v.extend_from_slice(data);
    let len = v.len() - HEADER;
    debug_assert!(len <= MAX_PAYLOAD);
    let crc = crc32(&v[HEADER..]);
    v[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    v[4..6].copy_from_slice(&VERSION.to_le_bytes());
    v[6..8].copy_from_slice(&(Kind::Pages as u16).to_le_bytes());
    v[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    v[12..16].copy_from_slice(&crc.to_le_bytes());
    v
}

/// Splits a PAGES payload.
pub fn parse_pages(p: &[u8]) -> Result<(u32, u64, &[u8]), WireError> {
    if p.len() < PAGES_HEAD {
        return Err(WireError::Malformed(
            "PAGES frame shorter than its header".into(),
        ));
    }
    let region = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
    let mut o = [0u8; 8];
    o.copy_from_slice(&p[4..12]);
    Ok((region, u64::from_le_bytes(o), &p[12..]))
}

/// Payload of a range marker (ZERO): region index, offset, length.
pub fn range_payload(region: u32, offset: u64, len: u64) -> [u8; 20] {
    let mut v = [0u8; 20];
    v[0..4].copy_from_slice(&region.to_le_bytes());
    v[4..12].copy_from_slice(&offset.to_le_bytes());
    v[12..20].copy_from_slice(&len.to_le_bytes());
    v
}

/// Splits a range marker payload.
pub fn parse_range(p: &[u8]) -> Result<(u32, u64, u64), WireError> {
    if p.len() != 20 {
        return Err(WireError::Malformed(format!(
            "range marker of {} bytes (20 expected)",
            p.len()
        )));
    }
    let mut o = [0u8; 8];
    o.copy_from_slice(&p[4..12]);
    let mut l = [0u8; 8];
    l.copy_from_slice(&p[12..20]);
    Ok((
        u32::from_le_bytes([p[0], p[1], p[2], p[3]]),
        u64::from_le_bytes(o),
        u64::from_le_bytes(l),
    ))
}

/// A REFUSE payload: the reason, cut to [`MAX_REASON`] bytes at a
/// character boundary.
pub fn refuse_payload(reason: &str) -> &[u8] {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason.as_bytes()[..end]
}

/// The reason in a REFUSE payload (lossy UTF-8, control characters
/// replaced, at most [`MAX_REASON`] bytes used).
pub fn parse_reason(p: &[u8]) -> String {
    String::from_utf8_lossy(&p[..p.len().min(MAX_REASON)])
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn frames_round_trip_and_damage_is_detected() {
        let mut buf = Vec::new();
        write_frame(&mut buf, Kind::Pages, &pages_payload(2, 4096, &[7u8; 100])).unwrap();
        let (k, p) = read_frame(&mut &buf[..]).unwrap();
        assert_eq!(k, Kind::Pages);
        let (r, o, d) = parse_pages(&p).unwrap();
        assert_eq!((r, o, d.len()), (2, 4096, 100));

        let mut bad = buf.clone();
        bad[40] ^= 1;
        assert!(matches!(
            read_frame(&mut &bad[..]),
            Err(WireError::Crc { .. })
        ));
        assert!(matches!(read_frame(&mut &buf[..50]), Err(WireError::Io(_))));
        let mut bad = buf.clone();
        bad[0] = 0;
        assert!(matches!(
            read_frame(&mut &bad[..]),
            Err(WireError::Magic(_))
        ));
        let mut bad = buf.clone();
        bad[4] = 9;
        assert!(matches!(
            read_frame(&mut &bad[..]),
            Err(WireError::Version(9))
        ));
        let mut bad = buf.clone();
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read_frame(&mut &bad[..]),
            Err(WireError::TooLong(_))
        ));
        let mut bad = buf;
        bad[6] = 99;
        assert!(matches!(
            read_frame(&mut &bad[..]),
            Err(WireError::Kind(99))
        ));
        assert!(parse_pages(&[1, 2]).is_err());
    }

    #[test]
    fn markers_and_reasons_are_bounded() {
        let p = range_payload(3, 8192, 1 << 20);
        assert_eq!(parse_range(&p).unwrap(), (3, 8192, 1 << 20));
        assert!(parse_range(&p[..19]).is_err());
        let long = "é".repeat(MAX_REASON);
        let r = refuse_payload(&long);
        assert!(r.len() <= MAX_REASON && std::str::from_utf8(r).is_ok());
        assert_eq!(parse_reason(b"no\nroom"), "no room");
        assert_eq!(parse_reason(&[b'x'; 4 * MAX_REASON]).len(), MAX_REASON);
    }
}
