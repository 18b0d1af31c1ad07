//! A strict JSON pull parser (RFC 8259): the caller asks for what it expects
//! next and gets it, or an error that says what was found instead.
//!
//! No NaN or Infinity, no trailing commas, no comments, no control characters
//! or lone surrogates in strings, valid UTF-8 (checked inside strings: outside
//! them any non-ASCII byte is already a syntax error), nesting at most
//! `MAX_DEPTH` deep. Nothing here panics on any input.

use crate::error::excerpt;
use std::borrow::Cow;

/// How deep arrays and objects may nest before the input is refused.
pub const MAX_DEPTH: usize = 256;

/// A parse error, with the JSON path to where it happened. Boxed, so that a
/// `Result` on the hot path is no bigger than its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(Box<ErrorInner>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct ErrorInner {
    /// Path segments, innermost first (they are added as the error unwinds).
    segments: Vec<Segment>,
    message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

impl Error {
    #[cold]
    pub fn new(message: impl Into<String>) -> Self {
        Error(Box::new(ErrorInner { segments: Vec::new(), message: message.into() }))
    }

    /// What is wrong, without the path.
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// The error happened inside the value of `key`.
    #[cold]
    pub fn in_key(mut self, key: &str) -> Self {
        self.0.segments.push(Segment::Key(key.to_owned()));
        self
    }

    /// The error happened inside element `index`.
    #[cold]
    pub fn in_index(mut self, index: usize) -> Self {
        self.0.segments.push(Segment::Index(index));
        self
    }

    /// `payload.results[3].bounding_box[1]`; empty at the top level.
    pub fn path(&self) -> String {
        let mut path = String::new();
        for seg in self.0.segments.iter().rev() {
            match seg {
                Segment::Key(k) => {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(k);
                }
                Segment::Index(i) => path.push_str(&format!("[{i}]")),
            }
        }
        path
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = self.path();
        if path.is_empty() {
            f.write_str(&self.0.message)
        } else {
            write!(f, "{path}: {}", self.0.message)
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// Attach a path segment to the error of a fallible step.
pub trait AtPath<T> {
    fn in_key(self, key: &str) -> Result<T>;
    fn in_index(self, index: usize) -> Result<T>;
}

impl<T> AtPath<T> for Result<T> {
    #[inline]
    fn in_key(self, key: &str) -> Result<T> {
        self.map_err(|e| e.in_key(key))
    }
    #[inline]
    fn in_index(self, index: usize) -> Result<T> {
        self.map_err(|e| e.in_index(index))
    }
}

/// What kind of value comes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Null,
    Bool,
    Number,
    String,
    Array,
    Object,
}

impl Kind {
    pub fn described(self) -> &'static str {
        match self {
            Kind::Null => "null",
            Kind::Bool => "a boolean",
            Kind::Number => "a number",
            Kind::String => "a string",
            Kind::Array => "a list",
            Kind::Object => "an object",
        }
    }
}

/// A number as written: its text, and whether it is a plain integer.
#[derive(Debug, Clone, Copy)]
pub struct Number<'a> {
    pub text: &'a str,
    pub integer: bool,
}

impl Number<'_> {
    /// The number as an `i64`, if it is an integer that fits.
    pub fn integer(&self) -> Result<i64> {
        if !self.integer {
            return Err(Error::new(format!("expected an integer, got {}", excerpt(self.text))));
        }
        parse_i64(self.text).ok_or_else(|| Error::new(format!("integer {} out of range", excerpt(self.text))))
    }
}

/// Where a parser is, to come back to.
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    pos: usize,
    depth: usize,
}

impl Mark {
    /// The byte offset in the input.
    pub fn position(self) -> usize {
        self.pos
    }
}

pub struct Parser<'a> {
    bytes: &'a [u8],
    pos: usize,
    depth: usize,
}

impl<'a> Parser<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Parser { bytes, pos: 0, depth: 0 }
    }

    /// How many bytes are left to read.
    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    /// Where the parser is now (after white space).
    pub fn mark(&mut self) -> Mark {
        self.skip_ws();
        Mark { pos: self.pos, depth: self.depth }
    }

    /// A parser over the same input, at `mark`.
    pub fn clone_at(&self, mark: Mark) -> Parser<'a> {
        Parser { bytes: self.bytes, pos: mark.pos, depth: mark.depth }
    }

    /// Go back to `mark`.
    pub fn reset(&mut self, mark: Mark) {
        self.pos = mark.pos;
        self.depth = mark.depth;
    }

    fn syntax(&self, what: &str) -> Error {
        match self.bytes.get(self.pos) {
            None => Error::new(format!("truncated JSON: unexpected end of input, expected {what}")),
            Some(&b) => Error::new(format!(
                "invalid JSON at byte {}: expected {what}, found {}",
                self.pos,
                shown(b)
            )),
        }
    }

    #[inline(always)]
    fn skip_ws(&mut self) {
        while let Some(&b) = self.bytes.get(self.pos) {
            if b > b' ' || !matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
                break;
            }
            self.pos += 1;
        }
    }

    /// Whether the next value starts with `byte` (after white space).
    #[inline(always)]
    pub fn at(&mut self, byte: u8) -> bool {
        self.skip_ws();
        self.bytes.get(self.pos) == Some(&byte)
    }

    /// The kind of the next value (after white space).
    #[inline]
    pub fn peek(&mut self) -> Result<Kind> {
        self.skip_ws();
        let rest = &self.bytes[self.pos..];
        match rest.first() {
            Some(b'n') if rest.starts_with(b"null") => Ok(Kind::Null),
            Some(b't') if rest.starts_with(b"true") => Ok(Kind::Bool),
            Some(b'f') if rest.starts_with(b"false") => Ok(Kind::Bool),
            Some(b'-' | b'0'..=b'9') => {
                if self.bytes[self.pos..].starts_with(b"-Infinity") {
                    return Err(self.not_json_number());
                }
                Ok(Kind::Number)
            }
            Some(b'"') => Ok(Kind::String),
            Some(b'[') => Ok(Kind::Array),
            Some(b'{') => Ok(Kind::Object),
            Some(b'N' | b'I') => Err(self.not_json_number()),
            _ => Err(self.syntax("a value")),
        }
    }

    fn not_json_number(&self) -> Error {
        Error::new(format!("invalid JSON at byte {}: NaN and Infinity are not JSON numbers", self.pos))
    }

    /// An error saying `expected` was wanted but something else came.
    pub fn expected(&mut self, expected: &str) -> Error {
        match self.peek() {
            Ok(kind) => Error::new(format!("expected {expected}, got {}", kind.described())),
            Err(e) => e,
        }
    }

    /// Everything has been read: only white space may follow.
    pub fn finish(&mut self) -> Result<()> {
        self.skip_ws();
        if self.pos < self.bytes.len() {
            return Err(Error::new(format!("invalid JSON at byte {}: trailing characters after the value", self.pos)));
        }
        Ok(())
    }

    fn literal(&mut self, word: &[u8]) -> Result<()> {
        if self.bytes[self.pos..].starts_with(word) {
            self.pos += word.len();
            Ok(())
        } else {
            Err(self.syntax(std::str::from_utf8(word).unwrap_or("a literal")))
        }
    }

    pub fn null(&mut self) -> Result<()> {
        if !self.at(b'n') {
            return Err(self.expected("null"));
        }
        self.literal(b"null")
    }

    pub fn bool(&mut self) -> Result<bool> {
        if self.peek()? != Kind::Bool {
            return Err(self.expected("true or false"));
        }
        if self.bytes[self.pos] == b't' {
            self.literal(b"true").map(|_| true)
        } else {
            self.literal(b"false").map(|_| false)
        }
    }

    /// The next number, as written. Checks the RFC 8259 grammar.
    pub fn number(&mut self) -> Result<Number<'a>> {
        if self.peek()? != Kind::Number {
            return Err(self.expected("a number"));
        }
        let start = self.pos;
        let b = self.bytes;
        let mut i = self.pos;
        if b[i] == b'-' {
            i += 1;
        }
        let digits = |mut i: usize| {
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            i
        };
        match b.get(i) {
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => i = digits(i + 1),
            _ => {
                self.pos = i;
                return Err(self.syntax("a digit"));
            }
        }
        let mut integer = true;
        if b.get(i) == Some(&b'.') {
            integer = false;
            let j = digits(i + 1);
            if j == i + 1 {
                self.pos = j;
                return Err(self.syntax("a digit after the decimal point"));
            }
            i = j;
        }
        if matches!(b.get(i), Some(b'e' | b'E')) {
            integer = false;
            i += 1;
            if matches!(b.get(i), Some(b'+' | b'-')) {
                i += 1;
            }
            let j = digits(i);
            if j == i {
                self.pos = j;
                return Err(self.syntax("a digit in the exponent"));
            }
            i = j;
        }
        self.pos = i;
        // Only ASCII digits, signs, '.', 'e' were accepted above.
        let text = std::str::from_utf8(&b[start..i]).map_err(|_| Error::new("invalid number"))?;
        Ok(Number { text, integer })
    }

    /// The next value as an `i64`: an integer written without a fraction or exponent.
    /// One pass: digits are checked and summed together.
    #[inline]
    pub fn int(&mut self) -> Result<i64> {
        let (start, mut i, negative) = self.number_start();
        let b = self.bytes;
        let mut magnitude: u64 = 0;
        match b.get(i) {
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => {
                while let Some(&d @ b'0'..=b'9') = b.get(i) {
                    magnitude = match magnitude.checked_mul(10).and_then(|m| m.checked_add((d - b'0') as u64)) {
                        Some(m) => m,
                        None => return self.slow_int(start),
                    };
                    i += 1;
                }
            }
            _ if negative => return self.slow_int(start),
            _ => return Err(self.expected("an integer")),
        }
        if matches!(b.get(i), Some(b'.' | b'e' | b'E')) {
            return self.slow_int(start);
        }
        let value = if negative { 0i64.checked_sub_unsigned(magnitude) } else { i64::try_from(magnitude).ok() };
        match value {
            Some(v) => {
                self.pos = i;
                Ok(v)
            }
            None => self.slow_int(start),
        }
    }

    /// Skip white space; return where the number starts, where its digits
    /// start, and whether it is negative.
    #[inline(always)]
    fn number_start(&mut self) -> (usize, usize, bool) {
        self.skip_ws();
        let start = self.pos;
        let negative = self.bytes.get(start) == Some(&b'-');
        (start, start + negative as usize, negative)
    }

    /// The general path for what `int` cannot take: the number's own error.
    #[cold]
    fn slow_int(&mut self, start: usize) -> Result<i64> {
        self.pos = start;
        self.number()?.integer()
    }

    /// The next value as a finite `f64` (integers too), correctly rounded.
    /// One pass; Clinger's exact fast path when the digits fit 2^53 and the
    /// power of ten is at most 22, the standard library otherwise.
    #[inline]
    pub fn float(&mut self) -> Result<f64> {
        let (start, mut i, negative) = self.number_start();
        let b = self.bytes;
        let mut mantissa: u64 = 0;
        let mut digits = 0u32;
        let mut exp10: i64 = 0;
        match b.get(i) {
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => i = accumulate_digits(b, i, &mut mantissa, &mut digits),
            _ if negative => return self.slow_float(start),
            _ => return Err(self.expected("a number")),
        }
        if b.get(i) == Some(&b'.') {
            i += 1;
            let first = i;
            i = accumulate_digits(b, i, &mut mantissa, &mut digits);
            if i == first {
                return self.slow_float(start);
            }
            exp10 -= (i - first) as i64;
        }
        if matches!(b.get(i), Some(b'e' | b'E')) {
            i += 1;
            let sign = match b.get(i) {
                Some(b'-') => {
                    i += 1;
                    -1
                }
                Some(b'+') => {
                    i += 1;
                    1
                }
                _ => 1,
            };
            let first = i;
            let mut e: i64 = 0;
            while let Some(&d @ b'0'..=b'9') = b.get(i) {
                e = (e * 10 + (d - b'0') as i64).min(1 << 20);
                i += 1;
            }
            if i == first {
                return self.slow_float(start);
            }
            exp10 += sign * e;
        }
        const POW10: [f64; 23] = [
            1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18,
            1e19, 1e20, 1e21, 1e22,
        ];
        if digits <= 19 && mantissa < (1 << 53) && (-22..=22).contains(&exp10) {
            let m = mantissa as f64;
            let v = if exp10 < 0 { m / POW10[(-exp10) as usize] } else { m * POW10[exp10 as usize] };
            self.pos = i;
            return Ok(if negative { -v } else { v });
        }
        self.slow_float(start)
    }

    /// The general path: the standard library's correctly rounded parse.
    #[cold]
    fn slow_float(&mut self, start: usize) -> Result<f64> {
        self.pos = start;
        let n = self.number()?;
        match n.text.parse::<f64>() {
            Ok(v) if v.is_finite() => Ok(v),
            _ => Err(Error::new(format!("number {} is out of range", excerpt(n.text)))),
        }
    }

    /// The next value as a string.
    #[inline]
    pub fn string(&mut self) -> Result<Cow<'a, str>> {
        if !self.at(b'"') {
            return Err(self.expected("a string"));
        }
        self.string_here()
    }

    fn string_here(&mut self) -> Result<Cow<'a, str>> {
        let b = self.bytes;
        let start = self.pos + 1;
        let mut i = start;
        let mut high = 0u8; // OR of every byte: below 0x80 means all ASCII
        while let Some(&c) = b.get(i) {
            if c == b'"' {
                self.pos = i + 1;
                if high < 0x80 {
                    // SAFETY: every byte of b[start..i] is ASCII, which is valid UTF-8.
                    return Ok(Cow::Borrowed(unsafe { std::str::from_utf8_unchecked(&b[start..i]) }));
                }
                return self.utf8(start, i).map(Cow::Borrowed);
            }
            if c == b'\\' {
                return self.escaped_string(start, i).map(Cow::Owned);
            }
            if c < 0x20 {
                self.pos = i;
                return Err(self.syntax("no control character inside a string"));
            }
            high |= c;
            i += 1;
        }
        self.pos = b.len();
        Err(self.syntax("the end of a string"))
    }

    fn utf8(&self, start: usize, end: usize) -> Result<&'a str> {
        std::str::from_utf8(&self.bytes[start..end])
            .map_err(|e| Error::new(format!("invalid UTF-8 in a string at byte {}", start + e.valid_up_to())))
    }

    fn escaped_string(&mut self, start: usize, first_escape: usize) -> Result<String> {
        let b = self.bytes;
        let mut out = String::from(self.utf8(start, first_escape)?);
        let mut i = first_escape;
        let mut run = i;
        loop {
            let Some(&c) = b.get(i) else {
                self.pos = b.len();
                return Err(self.syntax("the end of a string"));
            };
            match c {
                b'"' => {
                    out.push_str(self.utf8(run, i)?);
                    self.pos = i + 1;
                    return Ok(out);
                }
                b'\\' => {
                    out.push_str(self.utf8(run, i)?);
                    let Some(&e) = b.get(i + 1) else {
                        self.pos = b.len();
                        return Err(self.syntax("an escape"));
                    };
                    i += 2;
                    match e {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let (ch, next) = self.unicode_escape(i)?;
                            out.push(ch);
                            i = next;
                        }
                        _ => {
                            self.pos = i - 1;
                            return Err(self.syntax("a valid escape"));
                        }
                    }
                    run = i;
                }
                0..=0x1f => {
                    self.pos = i;
                    return Err(self.syntax("no control character inside a string"));
                }
                _ => i += 1,
            }
        }
    }

    /// `\uXXXX` (and its low surrogate) starting at the hex digits at `i`.
    fn unicode_escape(&mut self, i: usize) -> Result<(char, usize)> {
        let hex = |at: usize| -> Option<u32> {
            let s = self.bytes.get(at..at + 4)?;
            u32::from_str_radix(std::str::from_utf8(s).ok()?, 16).ok().filter(|_| s.iter().all(u8::is_ascii_hexdigit))
        };
        let bad = |p: &mut Self, at: usize| {
            p.pos = at;
            p.syntax("four hex digits of a valid \\u escape")
        };
        let Some(hi) = hex(i) else { return Err(bad(self, i)) };
        if (0xD800..0xDC00).contains(&hi) {
            if self.bytes.get(i + 4..i + 6) == Some(b"\\u") {
                if let Some(lo) = hex(i + 6).filter(|lo| (0xDC00..0xE000).contains(lo)) {
                    let c = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
                    return char::from_u32(c).map(|ch| (ch, i + 10)).ok_or_else(|| bad(self, i));
                }
            }
            return Err(bad(self, i));
        }
        char::from_u32(hi).map(|ch| (ch, i + 4)).ok_or_else(|| bad(self, i))
    }

    fn enter(&mut self) -> Result<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(Error::new(format!("JSON nested more than {MAX_DEPTH} deep at byte {}", self.pos)));
        }
        Ok(())
    }

    /// Open a list: true if it has a first element to read.
    #[inline]
    pub fn array(&mut self) -> Result<bool> {
        self.array_or(|| "a list".into())
    }

    /// Open a list, or fail with "expected <what>, got …".
    #[inline]
    pub fn array_or(&mut self, what: impl FnOnce() -> String) -> Result<bool> {
        if !self.at(b'[') {
            return Err(self.expected(&what()));
        }
        self.enter()?;
        self.pos += 1;
        self.skip_ws();
        if self.bytes.get(self.pos) == Some(&b']') {
            self.pos += 1;
            self.depth -= 1;
            return Ok(false);
        }
        Ok(true)
    }

    /// After an element: true if another follows, false at the closing `]`.
    #[inline]
    pub fn array_next(&mut self) -> Result<bool> {
        self.skip_ws();
        match self.bytes.get(self.pos) {
            Some(b',') => {
                self.pos += 1;
                Ok(true)
            }
            Some(b']') => {
                self.pos += 1;
                self.depth -= 1;
                Ok(false)
            }
            _ => Err(self.syntax("',' or ']'")),
        }
    }

    /// Open an object: its first key, if any.
    #[inline]
    pub fn object(&mut self) -> Result<Option<Cow<'a, str>>> {
        if !self.at(b'{') {
            return Err(self.expected("an object"));
        }
        self.enter()?;
        self.pos += 1;
        self.skip_ws();
        if self.bytes.get(self.pos) == Some(&b'}') {
            self.pos += 1;
            self.depth -= 1;
            return Ok(None);
        }
        self.key().map(Some)
    }

    /// After a member's value: the next key, or None at the closing `}`.
    #[inline]
    pub fn object_next(&mut self) -> Result<Option<Cow<'a, str>>> {
        self.skip_ws();
        match self.bytes.get(self.pos) {
            Some(b',') => {
                self.pos += 1;
                self.key().map(Some)
            }
            Some(b'}') => {
                self.pos += 1;
                self.depth -= 1;
                Ok(None)
            }
            _ => Err(self.syntax("',' or '}'")),
        }
    }

    /// After a member's value: if the next key is exactly `expected` (written
    /// plainly, no escapes), read it and return true. A fast path for writers
    /// that always put keys in the same order; on false nothing was read.
    #[inline(always)]
    pub fn next_key_is(&mut self, expected: &str) -> bool {
        self.skip_ws();
        let b = self.bytes;
        let e = expected.as_bytes();
        let at = self.pos;
        // , "expected" :
        if b.get(at) == Some(&b',')
            && b.get(at + 1) == Some(&b' ')
            && b.get(at + 2) == Some(&b'"')
            && b.get(at + 3..at + 3 + e.len()) == Some(e)
            && b.get(at + 3 + e.len()) == Some(&b'"')
            && b.get(at + 4 + e.len()) == Some(&b':')
        {
            self.pos = at + 5 + e.len();
            return true;
        }
        false
    }

    #[inline]
    fn key(&mut self) -> Result<Cow<'a, str>> {
        self.skip_ws();
        if self.bytes.get(self.pos) != Some(&b'"') {
            return Err(self.syntax("a key in double quotes"));
        }
        let key = self.string_here()?;
        self.skip_ws();
        if self.bytes.get(self.pos) != Some(&b':') {
            return Err(self.syntax("':'"));
        }
        self.pos += 1;
        Ok(key)
    }

    /// Read past the next value, whatever it is, checking its syntax.
    pub fn skip(&mut self) -> Result<()> {
        match self.peek()? {
            Kind::Null => self.null(),
            Kind::Bool => self.bool().map(|_| ()),
            Kind::Number => self.number().map(|_| ()),
            Kind::String => self.string().map(|_| ()),
            Kind::Array => {
                let mut i = 0;
                let mut more = self.array()?;
                while more {
                    self.skip().in_index(i)?;
                    i += 1;
                    more = self.array_next()?;
                }
                Ok(())
            }
            Kind::Object => {
                let mut key = self.object()?;
                while let Some(k) = key {
                    self.skip().in_key(&k)?;
                    key = self.object_next()?;
                }
                Ok(())
            }
        }
    }
}

/// Add the decimal digits at `bytes[i..]` to `mantissa` (wrapping; `digits`
/// counts them, so that the caller knows when it has overflowed); returns
/// where they end.
#[inline(always)]
fn accumulate_digits(bytes: &[u8], mut i: usize, mantissa: &mut u64, digits: &mut u32) -> usize {
    while let Some(v) = eight_digits(&bytes[i..]) {
        *mantissa = mantissa.wrapping_mul(100_000_000).wrapping_add(v);
        *digits += 8;
        i += 8;
    }
    while let Some(&d @ b'0'..=b'9') = bytes.get(i) {
        *mantissa = mantissa.wrapping_mul(10).wrapping_add((d - b'0') as u64);
        *digits += 1;
        i += 1;
    }
    i
}

/// The value of 8 ASCII digits at the start of `bytes`, if there are 8 and
/// all are digits: one multiply-and-shift round per pair size (the fast_float
/// method), instead of eight digit steps.
#[inline(always)]
fn eight_digits(bytes: &[u8]) -> Option<u64> {
    let chunk = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let all_digits = (chunk & 0xF0F0_F0F0_F0F0_F0F0) == 0x3030_3030_3030_3030
        && (chunk.wrapping_add(0x0606_0606_0606_0606) & 0xF0F0_F0F0_F0F0_F0F0) == 0x3030_3030_3030_3030;
    if !all_digits {
        return None;
    }
    let v = chunk - 0x3030_3030_3030_3030;
    let v = (v * 10) + (v >> 8);
    let v = ((v & 0x0000_00FF_0000_00FF).wrapping_mul(100 + (1_000_000 << 32))
        + ((v >> 16) & 0x0000_00FF_0000_00FF).wrapping_mul(1 + (10_000 << 32)))
        >> 32;
    Some(v)
}

fn shown(b: u8) -> String {
    if b.is_ascii_graphic() {
        format!("'{}'", b as char)
    } else {
        format!("byte 0x{b:02x}")
    }
}

/// Parse an optionally negative decimal integer; None on overflow.
#[inline]
fn parse_i64(text: &str) -> Option<i64> {
    let (neg, digits) = match text.as_bytes() {
        [b'-', rest @ ..] => (true, rest),
        rest => (false, rest),
    };
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    let mut v: i64 = 0;
    for &d in digits {
        let d = (d - b'0') as i64;
        v = if neg { v.checked_mul(10)?.checked_sub(d)? } else { v.checked_mul(10)?.checked_add(d)? };
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(input: &str, f: impl FnOnce(&mut Parser) -> Result<()>) -> String {
        f(&mut Parser::new(input.as_bytes())).unwrap_err().to_string()
    }

    #[test]
    fn numbers() {
        let mut p = Parser::new(b" -12 3.5e2 0 1e400 01 -");
        assert_eq!(p.int().unwrap(), -12);
        assert_eq!(p.float().unwrap(), 350.0);
        assert_eq!(p.float().unwrap(), 0.0);
        assert_eq!(p.float().unwrap_err().message(), "number 1e400 is out of range");
        // "01": the number is 0, then '1' is trailing.
        assert_eq!(p.int().unwrap(), 0);
        assert_eq!(p.int().unwrap(), 1);
        assert!(p.int().unwrap_err().message().contains("expected a digit"));
        assert_eq!(Parser::new(b"1.5").int().unwrap_err().message(), "expected an integer, got 1.5");
        assert_eq!(Parser::new(b"9223372036854775808").int().unwrap_err().message(), "integer 9223372036854775808 out of range");
        assert_eq!(Parser::new(b"-9223372036854775808").int().unwrap(), i64::MIN);
        assert_eq!(Parser::new(b"\"3\"").int().unwrap_err().message(), "expected an integer, got a string");
        assert_eq!(Parser::new(b"4.858891830104681").float().unwrap(), 4.858891830104681);
        assert_eq!(Parser::new(b"9007199254740993").float().unwrap(), 9007199254740992.0);
        assert_eq!(Parser::new(b"-0.0").float().unwrap().to_bits(), (-0.0f64).to_bits());
        assert_eq!(Parser::new(b"1e-400").float().unwrap(), 0.0);
        assert_eq!(Parser::new(b"1.").float().unwrap_err().message(), "truncated JSON: unexpected end of input, expected a digit after the decimal point");
        assert!(Parser::new(b"1e+").float().unwrap_err().message().contains("a digit in the exponent"));
        assert!(Parser::new(b"-").int().unwrap_err().message().contains("expected a digit"));
        assert_eq!(Parser::new(b"-0").int().unwrap(), 0);
        assert_eq!(Parser::new(b"12345678901234567890123").int().unwrap_err().message(), "integer 12345678901234567890123 out of range");
    }

    #[test]
    fn eight_digit_words() {
        assert_eq!(eight_digits(b"12345678"), Some(12345678));
        assert_eq!(eight_digits(b"00000000x"), Some(0));
        assert_eq!(eight_digits(b"99999999"), Some(99999999));
        assert_eq!(eight_digits(b"1234567"), None);
        assert_eq!(eight_digits(b"1234:678"), None);
        assert_eq!(eight_digits(b"1234/678"), None);
        assert_eq!(eight_digits(b"12345.78"), None);
    }

    #[test]
    fn expected_keys_are_taken_only_when_exact() {
        let mut p = Parser::new(br#"{"a": 1, "bb": 2, "b":3, "c": 4}"#);
        assert_eq!(p.object().unwrap().unwrap(), "a");
        assert_eq!(p.int().unwrap(), 1);
        assert!(!p.next_key_is("b"));
        assert!(p.next_key_is("bb"));
        assert_eq!(p.int().unwrap(), 2);
        assert!(!p.next_key_is("c"));
        assert_eq!(p.object_next().unwrap().unwrap(), "b");
        assert_eq!(p.int().unwrap(), 3);
    }

    /// The fast float path agrees with the standard library bit for bit.
    #[test]
    fn floats_match_the_standard_library() {
        let mut state = 0x9E3779B97F4A7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..200_000 {
            let v = f64::from_bits(next());
            if !v.is_finite() {
                continue;
            }
            for text in [format!("{v}"), format!("{v:e}"), format!("{:.3}", v / 1e300), crate::pyrepr::float_repr(v)] {
                let want: f64 = text.parse().unwrap();
                if !want.is_finite() {
                    continue;
                }
                let got = Parser::new(text.as_bytes()).float().unwrap();
                assert_eq!(got.to_bits(), want.to_bits(), "{text}");
            }
            let small = (next() % 100_000_000) as f64 / 1e6;
            let text = crate::pyrepr::float_repr(small);
            assert_eq!(Parser::new(text.as_bytes()).float().unwrap(), small, "{text}");
        }
    }

    #[test]
    fn nan_and_infinity_are_refused() {
        for s in ["NaN", "Infinity", "-Infinity"] {
            assert!(err(s, |p| p.float().map(|_| ())).contains("NaN and Infinity are not JSON numbers"), "{s}");
        }
    }

    #[test]
    fn strings_and_escapes() {
        let mut p = Parser::new(br#""plain" "a\"b\\c\/\n\u00e9\ud83d\ude00""#);
        assert_eq!(p.string().unwrap(), "plain");
        assert_eq!(p.string().unwrap(), "a\"b\\c/\n\u{e9}\u{1F600}");
        assert_eq!(Parser::new(b"\"caf\xc3\xa9\"").string().unwrap(), "caf\u{e9}");
        assert!(err(r#""\ud83d""#, |p| p.string().map(|_| ())).contains("valid \\u escape"));
        assert!(err("\"a\nb\"", |p| p.string().map(|_| ())).contains("control character"));
        assert!(err("\"ab", |p| p.string().map(|_| ())).starts_with("truncated JSON"));
        let bad = [b'"', 0xff, b'"'];
        assert_eq!(Parser::new(&bad).string().unwrap_err().message(), "invalid UTF-8 in a string at byte 1");
    }

    #[test]
    fn structure_and_paths() {
        let mut p = Parser::new(br#"{"a": [1, {"b": [true, "x"]}]}"#);
        let e = (|| -> Result<()> {
            let k = p.object()?.unwrap();
            assert_eq!(k, "a");
            assert!(p.array()?);
            p.int().in_index(0)?;
            assert!(p.array_next()?);
            (|| {
                assert_eq!(p.object()?.unwrap(), "b");
                (|| {
                    p.array()?;
                    p.bool().in_index(0)?;
                    p.array_next()?;
                    p.int().in_index(1)
                })()
                .in_key("b")
                .map(|_| ())
            })()
            .in_index(1)
            .in_key("a")
        })()
        .unwrap_err();
        assert_eq!(e.to_string(), "a[1].b[1]: expected an integer, got a string");
    }

    #[test]
    fn misspelt_literals_are_syntax_errors() {
        for s in ["nul", "not json", "tru", "fals", "nulll"] {
            let mut p = Parser::new(s.as_bytes());
            let e = p.skip().and_then(|_| p.finish()).unwrap_err().to_string();
            assert!(e.contains("invalid JSON") || e.contains("truncated JSON"), "{s}: {e}");
        }
    }

    #[test]
    fn skip_checks_syntax_and_depth() {
        let mut p = Parser::new(br#"{"a": [1, 2.5, null, true, {"b": "c"}], "d": {}} "#);
        p.skip().unwrap();
        p.finish().unwrap();
        assert!(err("[1, 2,]", |p| p.skip()).contains("expected a value"));
        assert!(err("{\"a\" 1}", |p| p.skip()).contains("expected ':'"));
        assert!(err("[1] x", |p| {
            p.skip()?;
            p.finish()
        })
        .contains("trailing characters"));
        let deep = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        assert!(err(&deep, |p| p.skip()).contains("nested more than"));
        let ok = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        Parser::new(ok.as_bytes()).skip().unwrap();
    }
}
