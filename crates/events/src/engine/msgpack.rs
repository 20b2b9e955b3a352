//! A minimal msgpack reader and writer for the engines' event wire.
//!
//! Hand-written rather than serde-driven for two reasons: a hostile frame must never make the
//! decoder allocate more than the frame's own size (every array length is checked against the
//! bytes left before anything is reserved), and the writer must reproduce msgspec's encoding
//! byte for byte (smallest integer form, `str8` for 32..=255 bytes, `float64` for floats).

use super::EngineWireError;

/// Nesting deeper than this is refused instead of recursing (values the decoder skips).
const MAX_DEPTH: u32 = 32;

/// A cursor over one msgpack document.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// A msgpack integer, signed or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Int {
    Unsigned(u64),
    Signed(i64),
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub(crate) fn is_at_end(&self) -> bool {
        self.pos == self.buf.len()
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn error(&self, what: &'static str) -> EngineWireError {
        EngineWireError::Msgpack {
            offset: self.pos,
            what,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], EngineWireError> {
        if n > self.remaining() {
            return Err(self.error("value runs past the end of the frame"));
        }
        let bytes = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    fn byte(&mut self) -> Result<u8, EngineWireError> {
        Ok(self.take(1)?[0])
    }

    fn be<const N: usize>(&mut self) -> Result<[u8; N], EngineWireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn peek(&self) -> Result<u8, EngineWireError> {
        self.buf
            .get(self.pos)
            .copied()
            .ok_or_else(|| self.error("frame ends where a value was expected"))
    }

    /// Consumes a nil if one is next.
    pub(crate) fn nil(&mut self) -> Result<bool, EngineWireError> {
        if self.peek()? == 0xc0 {
            self.pos += 1;
            return Ok(true);
        }
        Ok(false)
    }

    pub(crate) fn int(&mut self) -> Result<Int, EngineWireError> {
        let marker = self.byte()?;
        Ok(match marker {
            0x00..=0x7f => Int::Unsigned(u64::from(marker)),
            0xe0..=0xff => Int::Signed(i64::from(marker as i8)),
            0xcc => Int::Unsigned(u64::from(self.byte()?)),
            0xcd => Int::Unsigned(u64::from(u16::from_be_bytes(self.be()?))),
            0xce => Int::Unsigned(u64::from(u32::from_be_bytes(self.be()?))),
            0xcf => Int::Unsigned(u64::from_be_bytes(self.be()?)),
            0xd0 => Int::Signed(i64::from(self.byte()? as i8)),
            0xd1 => Int::Signed(i64::from(i16::from_be_bytes(self.be()?))),
            0xd2 => Int::Signed(i64::from(i32::from_be_bytes(self.be()?))),
            0xd3 => Int::Signed(i64::from_be_bytes(self.be()?)),
            _ => {
                self.pos -= 1;
                return Err(self.error("expected an integer"));
            }
        })
    }

    /// A `uint64` (how vLLM writes nearly every block hash), consumed; `None` (nothing
    /// consumed) for any other value.
    #[inline]
    pub(crate) fn u64_fast(&mut self) -> Option<u64> {
        match self.buf[self.pos..] {
            [0xcf, b0, b1, b2, b3, b4, b5, b6, b7, ..] => {
                self.pos += 9;
                Some(u64::from_be_bytes([b0, b1, b2, b3, b4, b5, b6, b7]))
            }
            _ => None,
        }
    }

    /// A non-negative integer that fits `u32`.
    pub(crate) fn u32(&mut self) -> Result<u32, EngineWireError> {
        match self.int()? {
            Int::Unsigned(v) => u32::try_from(v).ok(),
            Int::Signed(v) => u32::try_from(v).ok(),
        }
        .ok_or_else(|| self.error("integer out of range"))
    }

    pub(crate) fn f64(&mut self) -> Result<f64, EngineWireError> {
        match self.peek()? {
            0xcb => {
                self.pos += 1;
                Ok(f64::from_be_bytes(self.be()?))
            }
            0xca => {
                self.pos += 1;
                Ok(f64::from(f32::from_be_bytes(self.be()?)))
            }
            _ => match self.int()? {
                // msgspec writes whole floats as floats, but a hand-rolled producer may not.
                Int::Unsigned(v) => Ok(v as f64),
                Int::Signed(v) => Ok(v as f64),
            },
        }
    }

    /// The UTF-8 string next, borrowed from the frame.
    pub(crate) fn str(&mut self) -> Result<&'a str, EngineWireError> {
        let marker = self.peek()?;
        let len = match marker {
            0xa0..=0xbf => usize::from(marker & 0x1f),
            0xd9 => {
                self.pos += 1;
                usize::from(self.byte()?)
            }
            0xda => {
                self.pos += 1;
                usize::from(u16::from_be_bytes(self.be()?))
            }
            0xdb => {
                self.pos += 1;
                u32::from_be_bytes(self.be()?) as usize
            }
            _ => return Err(self.error("expected a string")),
        };
        if marker <= 0xbf {
            self.pos += 1;
        }
        std::str::from_utf8(self.take(len)?).map_err(|_| self.error("string is not UTF-8"))
    }

    /// Whether a string is next.
    pub(crate) fn at_str(&self) -> bool {
        matches!(self.peek(), Ok(0xa0..=0xbf | 0xd9..=0xdb))
    }

    /// Whether binary data is next.
    pub(crate) fn at_bin(&self) -> bool {
        matches!(self.peek(), Ok(0xc4..=0xc6))
    }

    /// Whether an array is next.
    pub(crate) fn at_array(&self) -> bool {
        matches!(self.peek(), Ok(0x90..=0x9f | 0xdc | 0xdd))
    }

    pub(crate) fn bin(&mut self) -> Result<&'a [u8], EngineWireError> {
        let len = match self.byte()? {
            0xc4 => usize::from(self.byte()?),
            0xc5 => usize::from(u16::from_be_bytes(self.be()?)),
            0xc6 => u32::from_be_bytes(self.be()?) as usize,
            _ => {
                self.pos -= 1;
                return Err(self.error("expected binary data"));
            }
        };
        self.take(len)
    }

    /// An array of non-negative integers that fit `u32` (token ids), appended to `out`: the
    /// hot loop of decoding, one marker match per element without the general paths.
    pub(crate) fn u32_array(&mut self, out: &mut Vec<u32>) -> Result<(), EngineWireError> {
        let len = self.array_len()?;
        out.reserve(len);
        for _ in 0..len {
            let rest = &self.buf[self.pos..];
            let (value, used) = match *rest {
                [m @ 0x00..=0x7f, ..] => (u32::from(m), 1),
                [0xcc, b, ..] => (u32::from(b), 2),
                [0xcd, b0, b1, ..] => (u32::from(u16::from_be_bytes([b0, b1])), 3),
                [0xce, b0, b1, b2, b3, ..] => (u32::from_be_bytes([b0, b1, b2, b3]), 5),
                _ => {
                    out.push(self.u32()?);
                    continue;
                }
            };
            self.pos += used;
            out.push(value);
        }
        Ok(())
    }

    /// An array header. The length is checked against the bytes left (every element takes at
    /// least one), so a caller may reserve it without trusting the frame.
    pub(crate) fn array_len(&mut self) -> Result<usize, EngineWireError> {
        let len = match self.byte()? {
            marker @ 0x90..=0x9f => usize::from(marker & 0x0f),
            0xdc => usize::from(u16::from_be_bytes(self.be()?)),
            0xdd => u32::from_be_bytes(self.be()?) as usize,
            _ => {
                self.pos -= 1;
                return Err(self.error("expected an array"));
            }
        };
        self.bounded(len)
    }

    /// A map header, bounded like [`Self::array_len`] (two values per entry).
    pub(crate) fn map_len(&mut self) -> Result<usize, EngineWireError> {
        let len = match self.byte()? {
            marker @ 0x80..=0x8f => usize::from(marker & 0x0f),
            0xde => usize::from(u16::from_be_bytes(self.be()?)),
            0xdf => u32::from_be_bytes(self.be()?) as usize,
            _ => {
                self.pos -= 1;
                return Err(self.error("expected a map"));
            }
        };
        self.bounded(len.saturating_mul(2)).map(|_| len)
    }

    fn bounded(&self, len: usize) -> Result<usize, EngineWireError> {
        if len > self.remaining() {
            return Err(self.error("array or map longer than the frame"));
        }
        Ok(len)
    }

    /// Skips one value of any type.
    pub(crate) fn skip(&mut self) -> Result<(), EngineWireError> {
        self.skip_at(0)
    }

    fn skip_at(&mut self, depth: u32) -> Result<(), EngineWireError> {
        if depth > MAX_DEPTH {
            return Err(self.error("nested too deeply"));
        }
        let marker = self.peek()?;
        match marker {
            0xc0 | 0xc2 | 0xc3 => self.pos += 1,
            0x00..=0x7f | 0xe0..=0xff | 0xcc..=0xd3 => {
                self.int()?;
            }
            0xca | 0xcb => {
                self.f64()?;
            }
            0xa0..=0xbf | 0xd9..=0xdb => {
                self.str()?;
            }
            0xc4..=0xc6 => {
                self.bin()?;
            }
            0x90..=0x9f | 0xdc | 0xdd => {
                for _ in 0..self.array_len()? {
                    self.skip_at(depth + 1)?;
                }
            }
            0x80..=0x8f | 0xde | 0xdf => {
                for _ in 0..self.map_len()? * 2 {
                    self.skip_at(depth + 1)?;
                }
            }
            // fixext, ext: a type byte and the data.
            0xd4..=0xd8 | 0xc7..=0xc9 => {
                self.pos += 1;
                let len = match marker {
                    0xd4..=0xd8 => 1usize << (marker - 0xd4),
                    0xc7 => usize::from(self.byte()?),
                    0xc8 => usize::from(u16::from_be_bytes(self.be()?)),
                    _ => u32::from_be_bytes(self.be()?) as usize,
                };
                self.take(len.saturating_add(1))?;
            }
            0xc1 => return Err(self.error("reserved marker 0xc1")),
        }
        Ok(())
    }
}

/// Writes msgpack as msgspec does.
pub(crate) struct Writer<'a> {
    pub(crate) out: &'a mut Vec<u8>,
}

impl Writer<'_> {
    pub(crate) fn nil(&mut self) {
        self.out.push(0xc0);
    }

    pub(crate) fn uint(&mut self, v: u64) {
        if v < 0x80 {
            self.out.push(v as u8);
        } else if v <= u64::from(u8::MAX) {
            self.out.extend_from_slice(&[0xcc, v as u8]);
        } else if v <= u64::from(u16::MAX) {
            self.out.push(0xcd);
            self.out.extend_from_slice(&(v as u16).to_be_bytes());
        } else if v <= u64::from(u32::MAX) {
            self.out.push(0xce);
            self.out.extend_from_slice(&(v as u32).to_be_bytes());
        } else {
            self.out.push(0xcf);
            self.out.extend_from_slice(&v.to_be_bytes());
        }
    }

    pub(crate) fn int(&mut self, v: i64) {
        if v >= 0 {
            self.uint(v.unsigned_abs());
        } else if v >= -32 {
            self.out.push(v as i8 as u8);
        } else if v >= i64::from(i8::MIN) {
            self.out.extend_from_slice(&[0xd0, v as i8 as u8]);
        } else if v >= i64::from(i16::MIN) {
            self.out.push(0xd1);
            self.out.extend_from_slice(&(v as i16).to_be_bytes());
        } else if v >= i64::from(i32::MIN) {
            self.out.push(0xd2);
            self.out.extend_from_slice(&(v as i32).to_be_bytes());
        } else {
            self.out.push(0xd3);
            self.out.extend_from_slice(&v.to_be_bytes());
        }
    }

    pub(crate) fn f64(&mut self, v: f64) {
        self.out.push(0xcb);
        self.out.extend_from_slice(&v.to_be_bytes());
    }

    pub(crate) fn str(&mut self, s: &str) {
        let len = s.len();
        if len < 32 {
            self.out.push(0xa0 | len as u8);
        } else if len <= usize::from(u8::MAX) {
            self.out.extend_from_slice(&[0xd9, len as u8]);
        } else if len <= usize::from(u16::MAX) {
            self.out.push(0xda);
            self.out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            self.out.push(0xdb);
            self.out
                .extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
        }
        self.out.extend_from_slice(s.as_bytes());
    }

    pub(crate) fn bin(&mut self, b: &[u8]) {
        let len = b.len();
        if len <= usize::from(u8::MAX) {
            self.out.extend_from_slice(&[0xc4, len as u8]);
        } else if len <= usize::from(u16::MAX) {
            self.out.push(0xc5);
            self.out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            self.out.push(0xc6);
            self.out
                .extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
        }
        self.out.extend_from_slice(b);
    }

    pub(crate) fn array(&mut self, len: usize) {
        self.header(len, 0x90, 0xdc, 0xdd);
    }

    pub(crate) fn map(&mut self, len: usize) {
        self.header(len, 0x80, 0xde, 0xdf);
    }

    /// A map header in the 16-bit form whatever its length (as msgspec writes structs of
    /// 16 fields or more).
    pub(crate) fn map16(&mut self, len: usize) {
        self.out.push(0xde);
        self.out
            .extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes());
    }

    fn header(&mut self, len: usize, fix: u8, m16: u8, m32: u8) {
        if len < 16 {
            self.out.push(fix | len as u8);
        } else if len <= usize::from(u16::MAX) {
            self.out.push(m16);
            self.out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            self.out.push(m32);
            self.out
                .extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
        }
    }
}
