//! The wire protocol of host-to-host migration over TCP.
//!
//! A stream of frames, each `magic | version | kind | length | crc32 |
//! payload`. Every frame is length-checked against [`MAX_PAYLOAD`] before
//! anything is allocated and CRC-checked before it is used, so a truncated
//! or corrupted stream is rejected with an error that says where, and the
//! receiver never acts on half a frame. Structured frames carry JSON;
//! memory frames carry raw pages.

use std::io::{Read, Write};

/// `"VBMW"`.
pub const MAGIC: u32 = 0x5642_4d57;
/// Protocol version.
pub const VERSION: u16 = 1;
/// Largest payload of one frame.
pub const MAX_PAYLOAD: usize = 4 << 20;
/// Bytes of memory per PAGES frame at most.
pub const CHUNK: usize = 1 << 20;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// Sender → receiver: what is coming (JSON [`crate::migration::remote::Hello`]).
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
    /// Either side: give up (UTF-8 reason).
    Abort = 7,
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
    /// A frame's contents are inconsistent.
    #[error("malformed {0}")]
    Malformed(String),
}

fn crc_table() -> &'static [u32; 256] {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    })
}

/// CRC-32 (IEEE).
pub fn crc32(data: &[u8]) -> u32 {
    let t = crc_table();
    !data.iter().fold(!0u32, |c, &b| {
        t[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8)
    })
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<(), WireError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(WireError::TooLong(payload.len()));
    }
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&VERSION.to_le_bytes());
    h[6..8].copy_from_slice(&(kind as u16).to_le_bytes());
    h[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    h[12..16].copy_from_slice(&crc32(payload).to_le_bytes());
    w.write_all(&h)?;
    w.write_all(payload)?;
    Ok(())
}

/// Reads one frame, checking magic, version, kind, length and CRC.
pub fn read_frame(r: &mut impl Read) -> Result<(Kind, Vec<u8>), WireError> {
    let mut h = [0u8; 16];
    r.read_exact(&mut h)?;
    let word = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    let magic = word(0);
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
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    let want = word(12);
    let got = crc32(&payload);
    if got != want {
        return Err(WireError::Crc { kind, got, want });
    }
    Ok((kind, payload))
}

/// Payload of a PAGES frame: region index, offset, then the bytes.
pub fn pages_payload(region: u32, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(12 + data.len());
    v.extend_from_slice(&region.to_le_bytes());
    v.extend_from_slice(&offset.to_le_bytes());
    v.extend_from_slice(data);
    v
}

/// Splits a PAGES payload.
pub fn parse_pages(p: &[u8]) -> Result<(u32, u64, &[u8]), WireError> {
    if p.len() < 12 {
        return Err(WireError::Malformed(
            "PAGES frame shorter than its header".into(),
        ));
    }
    let region = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
    let mut o = [0u8; 8];
    o.copy_from_slice(&p[4..12]);
    Ok((region, u64::from_le_bytes(o), &p[12..]))
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
}
