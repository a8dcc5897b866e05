//! Byte-range requests and the conditional headers that gate them, as the cache node needs them to
//! serve partial content out of its store. The module parses a client's `Range` header, resolves the
//! requested ranges against a representation's complete length (clamping, dropping unsatisfiable ones,
//! and coalescing overlaps), parses and formats `Content-Range`, evaluates `If-Range`,
//! `If-None-Match` and `If-Modified-Since`, and plans the `multipart/byteranges` framing of a
//! multi-range answer so that the exact `Content-Length` is known before any body byte is streamed.
//! Everything here is pure and allocation-light so it can be tested exhaustively; the semantics follow
//! RFC 9110 §14 (range requests) and §13.1 (preconditions).

use bytes::Bytes;
use std::time::SystemTime;

/// One range as written by the client, before it is resolved against a length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRangeSpec {
    /// `first-last` (inclusive).
    FromTo { first: u64, last: u64 },
    /// `first-` (open ended).
    From { first: u64 },
    /// `-suffix_len` (the last N bytes).
    Suffix { suffix_len: u64 },
}

/// A resolved, satisfiable range: inclusive byte positions within the representation.
///
/// The invariant `first <= last` always holds for values produced by [`resolve_ranges`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub first: u64,
    pub last: u64,
}

impl ByteRange {
    /// The number of bytes covered by the range, `last - first + 1`.
    pub fn len(&self) -> u64 {
        // The fields are public, so a caller could build an inverted or full-width range by hand.
        // Saturating arithmetic keeps a serving path from panicking on such a value; ranges coming
        // out of `resolve_ranges` never reach either saturation point.
        self.last.saturating_sub(self.first).saturating_add(1)
    }

    /// Always false: a byte range covers at least one byte.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Parse a `Range` header value. Returns None when the header is syntactically invalid
/// (unknown unit, garbage, first > last in a FromTo spec, empty list, overflow), because RFC 9110
/// says an invalid Range header is ignored (the full body is served with 200).
/// Accepts whitespace around commas and "bytes" unit case-insensitively; allows empty list elements
/// (",,") as the RFC's `#` list rule does, but at least one real spec is required.
pub fn parse_range_header(value: &str) -> Option<Vec<ByteRangeSpec>> {
    let (unit, range_set) = trim_ows(value).split_once('=')?;
    // Range unit names are case-insensitive (RFC 9110 §14.1), and "bytes" is the only unit we serve.
    if !unit.eq_ignore_ascii_case("bytes") {
        return None;
    }
    let mut specs = Vec::new();
    for element in range_set.split(',') {
        let element = trim_ows(element);
        // The `#` list rule (RFC 9110 §5.6.1) tells recipients to accept and ignore empty elements.
        if element.is_empty() {
            continue;
        }
        specs.push(parse_range_spec(element)?);
    }
    if specs.is_empty() {
        None
    } else {
        Some(specs)
    }
}

/// Parse one `int-range` or `suffix-range` element (RFC 9110 §14.1.2).
fn parse_range_spec(element: &str) -> Option<ByteRangeSpec> {
    if let Some(suffix_digits) = element.strip_prefix('-') {
        let suffix_len = parse_decimal(suffix_digits)?;
        return Some(ByteRangeSpec::Suffix { suffix_len });
    }
    let (first_digits, last_digits) = element.split_once('-')?;
    let first = parse_decimal(first_digits)?;
    if last_digits.is_empty() {
        return Some(ByteRangeSpec::From { first });
    }
    let last = parse_decimal(last_digits)?;
    // RFC 9110 §14.1.1 makes a range whose last position is below its first invalid, and a single
    // invalid element invalidates the whole header.
    if last < first {
        return None;
    }
    Some(ByteRangeSpec::FromTo { first, last })
}

/// The outcome of applying parsed specs to a representation of `complete_len` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeOutcome {
    /// Serve these ranges (206). Already sorted by `first` and coalesced where they overlap or are adjacent.
    Satisfiable(Vec<ByteRange>),
    /// None of the ranges is satisfiable: answer 416 with `Content-Range: bytes */complete_len`.
    Unsatisfiable,
    /// Too many ranges after coalescing (more than `max_ranges`): the caller rejects with 416 too,
    /// but we keep it distinct so logs can say why.
    TooManyRanges,
}

/// Resolve specs against a length. Rules: FromTo with first >= len is unsatisfiable (skipped);
/// last is clamped to len-1. From{first} with first>=len skipped. Suffix{0} skipped (unsatisfiable);
/// Suffix{n} with n >= len covers the whole representation (if len > 0). A zero-length representation makes
/// every range unsatisfiable. Overlapping or adjacent ranges are coalesced (RFC 9110 allows it).
///
/// A hand-built `FromTo` with `first > last` (which [`parse_range_header`] never yields) is treated as
/// unsatisfiable rather than trusted.
pub fn resolve_ranges(
    specs: &[ByteRangeSpec],
    complete_len: u64,
    max_ranges: usize,
) -> RangeOutcome {
    let mut ranges: Vec<ByteRange> = specs
        .iter()
        .filter_map(|spec| resolve_one(*spec, complete_len))
        .collect();
    if ranges.is_empty() {
        return RangeOutcome::Unsatisfiable;
    }
    ranges.sort_unstable_by_key(|range| (range.first, range.last));

    // Coalescing is permitted by RFC 9110 §14.2 and protects us from clients that ask for many small
    // overlapping pieces of the same bytes, which would otherwise multiply the response size.
    let mut coalesced: Vec<ByteRange> = Vec::with_capacity(ranges.len());
    for range in ranges {
        match coalesced.last_mut() {
            // `previous.last` is at most `complete_len - 1`, so adding one cannot overflow.
            Some(previous) if range.first <= previous.last + 1 => {
                previous.last = previous.last.max(range.last);
            }
            _ => coalesced.push(range),
        }
    }
    if coalesced.len() > max_ranges {
        RangeOutcome::TooManyRanges
    } else {
        RangeOutcome::Satisfiable(coalesced)
    }
}

/// Resolve one spec, returning None when it is unsatisfiable for `complete_len` (RFC 9110 §14.1.1).
fn resolve_one(spec: ByteRangeSpec, complete_len: u64) -> Option<ByteRange> {
    // With zero bytes there is no first position at all, so no range can be satisfied; checking
    // it up front also keeps `complete_len - 1` below from underflowing.
    if complete_len == 0 {
        return None;
    }
    let last_byte = complete_len - 1;
    match spec {
        ByteRangeSpec::FromTo { first, last } => {
            if first > last || first > last_byte {
                return None;
            }
            Some(ByteRange {
                first,
                last: last.min(last_byte),
            })
        }
        ByteRangeSpec::From { first } => {
            if first > last_byte {
                return None;
            }
            Some(ByteRange {
                first,
                last: last_byte,
            })
        }
        ByteRangeSpec::Suffix { suffix_len } => {
            if suffix_len == 0 {
                return None;
            }
            Some(ByteRange {
                first: complete_len.saturating_sub(suffix_len),
                last: last_byte,
            })
        }
    }
}

/// A parsed `Content-Range` header from an origin's 206 or 416 response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentRange {
    /// `bytes first-last/complete` ; complete is None for `*`.
    Bytes {
        first: u64,
        last: u64,
        complete_len: Option<u64>,
    },
    /// `bytes */complete` (416).
    Unsatisfied { complete_len: u64 },
}

/// Strict parser: returns None for anything malformed, including last < first,
/// or last >= complete_len when complete_len is known.
///
/// The grammar is RFC 9110 §14.4: the unit, exactly one space, then either `first-last/complete`,
/// `first-last/*`, or `*/complete`. We are strict because this header describes bytes we are about
/// to store: a misread origin range would poison the cache for every later client.
pub fn parse_content_range(value: &str) -> Option<ContentRange> {
    let (unit, rest) = trim_ows(value).split_once(' ')?;
    if !unit.eq_ignore_ascii_case("bytes") {
        return None;
    }
    let (range_part, complete_part) = rest.split_once('/')?;
    if range_part == "*" {
        let complete_len = parse_decimal(complete_part)?;
        return Some(ContentRange::Unsatisfied { complete_len });
    }
    let (first_digits, last_digits) = range_part.split_once('-')?;
    let first = parse_decimal(first_digits)?;
    let last = parse_decimal(last_digits)?;
    if last < first {
        return None;
    }
    let complete_len = if complete_part == "*" {
        None
    } else {
        let complete_len = parse_decimal(complete_part)?;
        if last >= complete_len {
            return None;
        }
        Some(complete_len)
    };
    Some(ContentRange::Bytes {
        first,
        last,
        complete_len,
    })
}

/// Format `bytes first-last/complete_len`.
pub fn format_content_range(range: ByteRange, complete_len: u64) -> String {
    format!("bytes {}-{}/{}", range.first, range.last, complete_len)
}

/// Format `bytes */complete_len`.
pub fn format_unsatisfied_content_range(complete_len: u64) -> String {
    format!("bytes */{complete_len}")
}

/// If-Range evaluation (RFC 9110 §13.1.5). `if_range` is the header value. Returns true when the Range
/// header should be honoured. An entity-tag If-Range matches only by STRONG comparison against `etag`
/// (a weak validator W/"x" in either never matches). An HTTP-date If-Range matches only when it equals
/// `last_modified` exactly (both parsed with httpdate; compare as SystemTime). Unparseable -> false.
///
/// Returning false makes the caller ignore `Range` and send the full representation, which is always
/// a correct answer; that is why every doubtful case lands there.
pub fn if_range_matches(if_range: &str, etag: Option<&str>, last_modified: Option<&str>) -> bool {
    let if_range = trim_ows(if_range);
    if if_range.starts_with('"') || if_range.starts_with("W/") {
        let Some(requested) = parse_entity_tag(if_range) else {
            return false;
        };
        let Some(current) = etag.and_then(|etag| parse_entity_tag(trim_ows(etag))) else {
            return false;
        };
        return requested.strong_eq(&current);
    }
    match (parse_date(if_range), last_modified.and_then(parse_date)) {
        (Some(requested), Some(current)) => requested == current,
        _ => false,
    }
}

/// If-None-Match evaluation with WEAK comparison (RFC 9110 §13.1.2): `*` matches when the
/// representation exists (always true here); otherwise a comma-separated list of entity tags, any of which
/// weakly matches `etag`. Returns true when the condition "matches", i.e. the server should answer 304.
///
/// A malformed list never matches: a 200 with the full body is always a safe answer, while a 304
/// built on a misparsed header could leave the client with a stale copy.
pub fn if_none_match_matches(if_none_match: &str, etag: Option<&str>) -> bool {
    let if_none_match = trim_ows(if_none_match);
    if if_none_match == "*" {
        return true;
    }
    let Some(current) = etag.and_then(|etag| parse_entity_tag(trim_ows(etag))) else {
        return false;
    };
    match parse_entity_tag_list(if_none_match) {
        Some(requested) => requested.iter().any(|tag| tag.weak_eq(&current)),
        None => false,
    }
}

/// If-Modified-Since: true when the representation has NOT been modified since the date, i.e. 304.
/// Both values are HTTP-dates; unparseable either side -> false.
///
/// RFC 9110 §13.1.3 evaluates the condition as false (so 304) when the last modification is earlier
/// than or equal to the given date; HTTP-dates have one-second resolution, so equality is common.
pub fn not_modified_since(if_modified_since: &str, last_modified: Option<&str>) -> bool {
    match (
        parse_date(if_modified_since),
        last_modified.and_then(parse_date),
    ) {
        (Some(since), Some(modified)) => modified <= since,
        _ => false,
    }
}

/// multipart/byteranges framing (RFC 9110 §14.6). Built up front so the caller knows the exact
/// Content-Length before streaming any body bytes.
#[derive(Debug, Clone)]
pub struct MultipartPlan {
    pub boundary: String,
    /// For each range, the part header bytes to send BEFORE that range's body bytes
    /// ("\r\n--boundary\r\nContent-Type: ...\r\nContent-Range: bytes a-b/len\r\n\r\n"; the first part's leading CRLF may be omitted).
    pub part_headers: Vec<Bytes>,
    /// The closing delimiter "\r\n--boundary--\r\n".
    pub trailer: Bytes,
    /// Total body length: all part headers + all range lengths + trailer.
    pub body_len: u64,
}

impl MultipartPlan {
    /// `content_type` is the representation's type if known (omit the part Content-Type line if None).
    /// `boundary` is supplied by the caller (so tests are deterministic).
    ///
    /// The caller must choose a boundary that cannot occur in the body (RFC 2046 §5.1.1 allows 1 to 70
    /// characters); a long random token is the usual way.
    pub fn new(
        ranges: &[ByteRange],
        complete_len: u64,
        content_type: Option<&str>,
        boundary: &str,
    ) -> Self {
        // A content type containing CR or LF would let an origin inject extra part headers, so such a
        // value is dropped; the part is still valid without it.
        let content_type_line = content_type
            .filter(|content_type| !content_type.contains(['\r', '\n']))
            .map(|content_type| format!("Content-Type: {content_type}\r\n"))
            .unwrap_or_default();

        let part_headers: Vec<Bytes> = ranges
            .iter()
            .enumerate()
            .map(|(index, range)| {
                // The first delimiter needs no preceding CRLF because there is no preamble before it;
                // every later delimiter's CRLF terminates the previous part's body (RFC 2046 §5.1.1).
                let leading_crlf = if index == 0 { "" } else { "\r\n" };
                Bytes::from(format!(
                    "{leading_crlf}--{boundary}\r\n{content_type_line}Content-Range: {}\r\n\r\n",
                    format_content_range(*range, complete_len)
                ))
            })
            .collect();
        let trailer = Bytes::from(format!("\r\n--{boundary}--\r\n"));

        let header_bytes: u64 = part_headers.iter().map(|part| part.len() as u64).sum();
        let range_bytes: u64 = ranges.iter().map(ByteRange::len).sum();
        let body_len = header_bytes + range_bytes + trailer.len() as u64;

        MultipartPlan {
            boundary: boundary.to_owned(),
            part_headers,
            trailer,
            body_len,
        }
    }

    /// The value for the response's Content-Type: `multipart/byteranges; boundary=...`.
    pub fn content_type(&self) -> String {
        // A boundary made only of token characters can be sent bare; anything else (RFC 2046 allows
        // spaces and some separators) must be a quoted-string to survive parameter parsing.
        if !self.boundary.is_empty() && self.boundary.bytes().all(is_token_byte) {
            format!("multipart/byteranges; boundary={}", self.boundary)
        } else {
            format!("multipart/byteranges; boundary=\"{}\"", self.boundary)
        }
    }
}

/// An entity tag split into its weakness flag and its opaque quoted part (RFC 9110 §8.8.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EntityTag<'a> {
    weak: bool,
    /// The opaque tag including its surrounding double quotes.
    opaque: &'a str,
}

impl EntityTag<'_> {
    /// Strong comparison: both tags strong and their opaque parts identical (RFC 9110 §8.8.3.2).
    fn strong_eq(&self, other: &EntityTag<'_>) -> bool {
        !self.weak && !other.weak && self.opaque == other.opaque
    }

    /// Weak comparison: opaque parts identical, whatever the weakness flags say.
    fn weak_eq(&self, other: &EntityTag<'_>) -> bool {
        self.opaque == other.opaque
    }
}

/// Parse exactly one entity tag with nothing around it.
fn parse_entity_tag(value: &str) -> Option<EntityTag<'_>> {
    match split_entity_tag(value)? {
        (tag, "") => Some(tag),
        _ => None,
    }
}

/// Parse an entity tag at the start of `value`, returning it and the unparsed remainder.
fn split_entity_tag(value: &str) -> Option<(EntityTag<'_>, &str)> {
    let (weak, quoted) = match value.strip_prefix("W/") {
        Some(quoted) => (true, quoted),
        None => (false, value),
    };
    let after_open_quote = quoted.strip_prefix('"')?;
    let close_quote = after_open_quote.find('"')?;
    let inner = &after_open_quote[..close_quote];
    // etagc is %x21 / %x23-7E / obs-text: visible characters other than the double quote, which
    // `find` already excluded, plus any non-ASCII byte.
    let is_etagc = |byte: u8| byte == 0x21 || (0x23..=0x7e).contains(&byte) || byte >= 0x80;
    if !inner.bytes().all(is_etagc) {
        return None;
    }
    // The opaque part spans both quotes: one for the opening quote, the inner text, one closing.
    let opaque = &quoted[..close_quote + 2];
    Some((EntityTag { weak, opaque }, &quoted[close_quote + 2..]))
}

/// Parse a `#entity-tag` list. Entity tags may contain commas, so the list cannot simply be split
/// on ','; instead each tag is consumed whole and must be followed by a comma or the end.
fn parse_entity_tag_list(value: &str) -> Option<Vec<EntityTag<'_>>> {
    let mut tags = Vec::new();
    let mut rest = value;
    loop {
        // Empty elements and optional whitespace between elements are allowed by the list rule.
        rest = rest.trim_start_matches([' ', '\t', ',']);
        if rest.is_empty() {
            break;
        }
        let (tag, remainder) = split_entity_tag(rest)?;
        tags.push(tag);
        rest = remainder.trim_start_matches([' ', '\t']);
        if !rest.is_empty() && !rest.starts_with(',') {
            return None;
        }
    }
    if tags.is_empty() {
        None
    } else {
        Some(tags)
    }
}

/// Parse an HTTP-date in any of the three formats RFC 9110 §5.6.7 obliges recipients to accept.
fn parse_date(value: &str) -> Option<SystemTime> {
    httpdate::parse_http_date(trim_ows(value)).ok()
}

/// Parse `1*DIGIT` as a u64. `str::parse` alone would also accept a leading '+', which the
/// grammar forbids, and it reports overflow as an error, which we turn into None.
fn parse_decimal(digits: &str) -> Option<u64> {
    if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Strip optional whitespace (SP and HTAB, RFC 9110 §5.6.3) from both ends.
fn trim_ows(value: &str) -> &str {
    value.trim_matches([' ', '\t'])
}

/// Whether a byte may appear in an RFC 9110 §5.6.2 token.
fn is_token_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn from_to(first: u64, last: u64) -> ByteRangeSpec {
        ByteRangeSpec::FromTo { first, last }
    }

    fn from(first: u64) -> ByteRangeSpec {
        ByteRangeSpec::From { first }
    }

    fn suffix(suffix_len: u64) -> ByteRangeSpec {
        ByteRangeSpec::Suffix { suffix_len }
    }

    fn range(first: u64, last: u64) -> ByteRange {
        ByteRange { first, last }
    }

    #[test]
    fn parse_range_header_table() {
        let cases: Vec<(&str, Option<Vec<ByteRangeSpec>>)> = vec![
            ("bytes=0-0", Some(vec![from_to(0, 0)])),
            ("bytes=0-499", Some(vec![from_to(0, 499)])),
            ("bytes=500-", Some(vec![from(500)])),
            ("bytes=-500", Some(vec![suffix(500)])),
            ("bytes=0-0,-1", Some(vec![from_to(0, 0), suffix(1)])),
            ("bytes= 0-1 , 5-6", Some(vec![from_to(0, 1), from_to(5, 6)])),
            ("BYTES=1-2", Some(vec![from_to(1, 2)])),
            ("Bytes=1-2", Some(vec![from_to(1, 2)])),
            ("bytes=,,0-1,,", Some(vec![from_to(0, 1)])),
            ("bytes=0-1,\t2-3", Some(vec![from_to(0, 1), from_to(2, 3)])),
            ("bytes=-0", Some(vec![suffix(0)])),
            ("bytes=007-9", Some(vec![from_to(7, 9)])),
            ("bytes=18446744073709551615-", Some(vec![from(u64::MAX)])),
            (
                "bytes=5-5,1-2,9-",
                Some(vec![from_to(5, 5), from_to(1, 2), from(9)]),
            ),
            ("bytes=", None),
            ("bytes=,", None),
            ("bytes= , ", None),
            ("bytes=5-1", None),
            ("items=0-1", None),
            ("bytes=a-b", None),
            ("bytes=--1", None),
            ("bytes=1-2-3", None),
            ("0-1", None),
            ("bytes=-", None),
            ("bytes=99999999999999999999999-", None),
            ("bytes=0-99999999999999999999999", None),
            ("bytes=-18446744073709551616", None),
            ("bytes=+1-2", None),
            ("bytes=1-+2", None),
            ("bytes=1 -2", None),
            ("bytes=0-1,garbage", None),
            ("bytes =0-1", None),
            ("", None),
            ("=", None),
        ];
        for (input, expected) in cases {
            assert_eq!(parse_range_header(input), expected, "input {input:?}");
        }
    }

    #[test]
    fn resolve_ranges_table() {
        use RangeOutcome::{Satisfiable, TooManyRanges, Unsatisfiable};
        let cases: Vec<(&str, Vec<ByteRangeSpec>, u64, usize, RangeOutcome)> = vec![
            (
                "simple",
                vec![from_to(0, 499)],
                1000,
                8,
                Satisfiable(vec![range(0, 499)]),
            ),
            (
                "clamp last",
                vec![from_to(900, 5000)],
                1000,
                8,
                Satisfiable(vec![range(900, 999)]),
            ),
            (
                "open ended",
                vec![from(10)],
                100,
                8,
                Satisfiable(vec![range(10, 99)]),
            ),
            (
                "suffix",
                vec![suffix(10)],
                100,
                8,
                Satisfiable(vec![range(90, 99)]),
            ),
            (
                "suffix equal len",
                vec![suffix(100)],
                100,
                8,
                Satisfiable(vec![range(0, 99)]),
            ),
            (
                "suffix bigger",
                vec![suffix(5000)],
                100,
                8,
                Satisfiable(vec![range(0, 99)]),
            ),
            (
                "suffix max",
                vec![suffix(u64::MAX)],
                1,
                8,
                Satisfiable(vec![range(0, 0)]),
            ),
            ("suffix zero", vec![suffix(0)], 100, 8, Unsatisfiable),
            ("zero len suffix", vec![suffix(5)], 0, 8, Unsatisfiable),
            ("zero len from", vec![from(0)], 0, 8, Unsatisfiable),
            ("zero len from-to", vec![from_to(0, 0)], 0, 8, Unsatisfiable),
            (
                "first at len",
                vec![from_to(100, 200)],
                100,
                8,
                Unsatisfiable,
            ),
            ("from at len", vec![from(100)], 100, 8, Unsatisfiable),
            (
                "last byte",
                vec![from(99)],
                100,
                8,
                Satisfiable(vec![range(99, 99)]),
            ),
            ("empty specs", vec![], 100, 8, Unsatisfiable),
            (
                "inverted hand-built",
                vec![from_to(5, 1)],
                100,
                8,
                Unsatisfiable,
            ),
            (
                "unsatisfiable dropped",
                vec![from_to(500, 600), from_to(0, 0)],
                100,
                8,
                Satisfiable(vec![range(0, 0)]),
            ),
            (
                "overlap",
                vec![from_to(0, 10), from_to(5, 20)],
                100,
                8,
                Satisfiable(vec![range(0, 20)]),
            ),
            (
                "adjacent",
                vec![from_to(0, 9), from_to(10, 19)],
                100,
                8,
                Satisfiable(vec![range(0, 19)]),
            ),
            (
                "gap of one kept",
                vec![from_to(0, 9), from_to(11, 19)],
                100,
                8,
                Satisfiable(vec![range(0, 9), range(11, 19)]),
            ),
            (
                "contained",
                vec![from_to(0, 50), from_to(10, 20)],
                100,
                8,
                Satisfiable(vec![range(0, 50)]),
            ),
            (
                "sorted",
                vec![from_to(50, 60), suffix(1), from_to(0, 0)],
                100,
                8,
                Satisfiable(vec![range(0, 0), range(50, 60), range(99, 99)]),
            ),
            (
                "suffix meets from-to",
                vec![from_to(0, 89), suffix(10)],
                100,
                8,
                Satisfiable(vec![range(0, 99)]),
            ),
            (
                "too many",
                vec![from_to(0, 0), from_to(2, 2), from_to(4, 4)],
                100,
                2,
                TooManyRanges,
            ),
            (
                "at the limit",
                vec![from_to(0, 0), from_to(2, 2)],
                100,
                2,
                Satisfiable(vec![range(0, 0), range(2, 2)]),
            ),
            (
                "coalesced under limit",
                vec![from_to(0, 0), from_to(1, 1), from_to(2, 2)],
                100,
                1,
                Satisfiable(vec![range(0, 2)]),
            ),
            (
                "unsatisfiable beats limit",
                vec![from(500), from(600)],
                100,
                0,
                Unsatisfiable,
            ),
            (
                "huge len",
                vec![from(u64::MAX - 1)],
                u64::MAX,
                8,
                Satisfiable(vec![range(u64::MAX - 1, u64::MAX - 1)]),
            ),
        ];
        for (name, specs, complete_len, max_ranges, expected) in cases {
            assert_eq!(
                resolve_ranges(&specs, complete_len, max_ranges),
                expected,
                "case {name}"
            );
        }
    }

    #[test]
    fn byte_range_len() {
        assert_eq!(range(0, 0).len(), 1);
        assert_eq!(range(10, 19).len(), 10);
        assert!(!range(3, 3).is_empty());
    }

    #[test]
    fn parse_content_range_table() {
        let bytes = |first, last, complete_len| ContentRange::Bytes {
            first,
            last,
            complete_len,
        };
        let cases: Vec<(&str, Option<ContentRange>)> = vec![
            ("bytes 0-0/1", Some(bytes(0, 0, Some(1)))),
            ("bytes 0-9/*", Some(bytes(0, 9, None))),
            (
                "bytes */100",
                Some(ContentRange::Unsatisfied { complete_len: 100 }),
            ),
            (
                "bytes */0",
                Some(ContentRange::Unsatisfied { complete_len: 0 }),
            ),
            (
                "bytes 21010-47021/47022",
                Some(bytes(21010, 47021, Some(47022))),
            ),
            ("Bytes 1-2/3", Some(bytes(1, 2, Some(3)))),
            ("bytes 0-0/0", None),
            ("bytes 0-9/9", None),
            ("bytes 5-4/10", None),
            ("bytes */*", None),
            ("bytes *", None),
            ("bytes 0-9", None),
            ("bytes 0-/10", None),
            ("bytes -9/10", None),
            ("bytes=0-9/10", None),
            ("bytes  0-9/10", None),
            ("bytes 0 - 9/10", None),
            ("items 0-9/10", None),
            ("0-9/10", None),
            ("bytes 0-9/10x", None),
            ("bytes +0-9/10", None),
            ("bytes 0-9/99999999999999999999999", None),
            ("bytes a-b/c", None),
            ("", None),
        ];
        for (input, expected) in cases {
            assert_eq!(parse_content_range(input), expected, "input {input:?}");
        }
    }

    #[test]
    fn format_content_range_values() {
        assert_eq!(format_content_range(range(0, 0), 1), "bytes 0-0/1");
        assert_eq!(format_content_range(range(5, 9), 100), "bytes 5-9/100");
        assert_eq!(format_unsatisfied_content_range(100), "bytes */100");
    }

    const DATE: &str = "Sun, 06 Nov 1994 08:49:37 GMT";
    const DATE_RFC850: &str = "Sunday, 06-Nov-94 08:49:37 GMT";
    const DATE_ASCTIME: &str = "Sun Nov  6 08:49:37 1994";
    const LATER_DATE: &str = "Sun, 06 Nov 1994 08:49:38 GMT";
    const EARLIER_DATE: &str = "Sun, 06 Nov 1994 08:49:36 GMT";

    #[test]
    fn if_range_table() {
        let cases: Vec<(&str, Option<&str>, Option<&str>, bool)> = vec![
            ("\"abc\"", Some("\"abc\""), None, true),
            (" \"abc\" ", Some("\"abc\""), None, true),
            ("\"abc\"", Some("\"abd\""), None, false),
            ("\"abc\"", None, Some(DATE), false),
            ("W/\"abc\"", Some("\"abc\""), None, false),
            ("\"abc\"", Some("W/\"abc\""), None, false),
            ("W/\"abc\"", Some("W/\"abc\""), None, false),
            ("\"abc", Some("\"abc\""), None, false),
            ("\"abc\"x", Some("\"abc\""), None, false),
            ("\"abc\"", Some("abc"), None, false),
            ("\"\"", Some("\"\""), None, true),
            ("\"a,b\"", Some("\"a,b\""), None, true),
            (DATE, None, Some(DATE), true),
            (DATE_RFC850, None, Some(DATE), true),
            (DATE_ASCTIME, None, Some(DATE), true),
            (DATE, Some("\"abc\""), Some(DATE), true),
            (LATER_DATE, None, Some(DATE), false),
            (EARLIER_DATE, None, Some(DATE), false),
            (DATE, None, None, false),
            (DATE, None, Some("yesterday"), false),
            ("yesterday", None, Some(DATE), false),
            ("", Some("\"abc\""), Some(DATE), false),
        ];
        for (if_range, etag, last_modified, expected) in cases {
            assert_eq!(
                if_range_matches(if_range, etag, last_modified),
                expected,
                "If-Range {if_range:?} etag {etag:?} last_modified {last_modified:?}"
            );
        }
    }

    #[test]
    fn if_none_match_table() {
        let cases: Vec<(&str, Option<&str>, bool)> = vec![
            ("*", Some("\"abc\""), true),
            ("*", None, true),
            (" * ", None, true),
            ("\"abc\"", Some("\"abc\""), true),
            ("\"abc\"", Some("W/\"abc\""), true),
            ("W/\"abc\"", Some("\"abc\""), true),
            ("W/\"abc\"", Some("W/\"abc\""), true),
            ("\"abc\"", Some("\"abd\""), false),
            ("\"abc\"", None, false),
            ("\"x\", \"abc\"", Some("\"abc\""), true),
            ("\"x\",W/\"abc\"", Some("\"abc\""), true),
            ("\"x\" , \"y\"", Some("\"abc\""), false),
            (", ,\"abc\",,", Some("\"abc\""), true),
            ("\"a,b\"", Some("\"a,b\""), true),
            ("\"a,b\"", Some("\"a\""), false),
            ("\"a\" \"b\"", Some("\"b\""), false),
            ("abc", Some("abc"), false),
            ("\"abc", Some("\"abc\""), false),
            ("*, \"abc\"", Some("\"abc\""), false),
            ("", Some("\"abc\""), false),
            ("w/\"abc\"", Some("\"abc\""), false),
        ];
        for (if_none_match, etag, expected) in cases {
            assert_eq!(
                if_none_match_matches(if_none_match, etag),
                expected,
                "If-None-Match {if_none_match:?} etag {etag:?}"
            );
        }
    }

    #[test]
    fn if_modified_since_table() {
        let cases: Vec<(&str, Option<&str>, bool)> = vec![
            (DATE, Some(DATE), true),
            (LATER_DATE, Some(DATE), true),
            (EARLIER_DATE, Some(DATE), false),
            (DATE_RFC850, Some(DATE), true),
            (DATE_ASCTIME, Some(DATE), true),
            (DATE, None, false),
            ("not a date", Some(DATE), false),
            (DATE, Some("not a date"), false),
            ("", Some(DATE), false),
        ];
        for (if_modified_since, last_modified, expected) in cases {
            assert_eq!(
                not_modified_since(if_modified_since, last_modified),
                expected,
                "If-Modified-Since {if_modified_since:?} last_modified {last_modified:?}"
            );
        }
    }

    /// Concatenate a plan's pieces around slices of `body`, as the serving code will.
    fn render_multipart(plan: &MultipartPlan, ranges: &[ByteRange], body: &[u8]) -> Vec<u8> {
        let mut rendered = Vec::new();
        for (part_header, range) in plan.part_headers.iter().zip(ranges) {
            rendered.extend_from_slice(part_header);
            rendered.extend_from_slice(&body[range.first as usize..=range.last as usize]);
        }
        rendered.extend_from_slice(&plan.trailer);
        rendered
    }

    /// A deliberately independent reader of multipart/byteranges: returns each part's
    /// Content-Type (if any), parsed Content-Range and body bytes.
    fn parse_multipart(
        rendered: &[u8],
        boundary: &str,
    ) -> Vec<(Option<String>, ContentRange, Vec<u8>)> {
        let delimiter = format!("--{boundary}");
        let mut parts = Vec::new();
        let mut rest = rendered;
        // The first delimiter may or may not be preceded by a CRLF.
        if rest.starts_with(b"\r\n") {
            rest = &rest[2..];
        }
        loop {
            assert!(rest.starts_with(delimiter.as_bytes()), "missing delimiter");
            rest = &rest[delimiter.len()..];
            if rest == b"--\r\n" {
                break;
            }
            assert!(rest.starts_with(b"\r\n"), "delimiter line not terminated");
            rest = &rest[2..];
            let mut content_type = None;
            let mut content_range = None;
            loop {
                let line_end = rest
                    .windows(2)
                    .position(|window| window == b"\r\n")
                    .expect("header line end");
                let line = std::str::from_utf8(&rest[..line_end]).expect("utf-8 header");
                rest = &rest[line_end + 2..];
                if line.is_empty() {
                    break;
                }
                let (name, value) = line.split_once(": ").expect("header colon");
                match name.to_ascii_lowercase().as_str() {
                    "content-type" => content_type = Some(value.to_owned()),
                    "content-range" => content_range = parse_content_range(value),
                    other => panic!("unexpected part header {other}"),
                }
            }
            let content_range = content_range.expect("part has a Content-Range");
            let ContentRange::Bytes { first, last, .. } = content_range else {
                panic!("part Content-Range must be satisfied");
            };
            let part_len = (last - first + 1) as usize;
            parts.push((content_type, content_range, rest[..part_len].to_vec()));
            rest = &rest[part_len..];
            assert!(rest.starts_with(b"\r\n"), "part body not followed by CRLF");
            rest = &rest[2..];
        }
        parts
    }

    #[test]
    fn multipart_plan_round_trip() {
        let body: Vec<u8> = (0..200u32).map(|index| (index * 7 % 251) as u8).collect();
        let ranges = [range(0, 0), range(10, 49), range(199, 199)];
        for content_type in [Some("application/octet-stream"), None] {
            let plan = MultipartPlan::new(&ranges, body.len() as u64, content_type, "THIS_STRING");
            let rendered = render_multipart(&plan, &ranges, &body);
            assert_eq!(plan.body_len, rendered.len() as u64);

            let parts = parse_multipart(&rendered, "THIS_STRING");
            assert_eq!(parts.len(), ranges.len());
            for ((part_type, part_range, part_body), expected) in parts.iter().zip(&ranges) {
                assert_eq!(part_type.as_deref(), content_type);
                assert_eq!(
                    *part_range,
                    ContentRange::Bytes {
                        first: expected.first,
                        last: expected.last,
                        complete_len: Some(200),
                    }
                );
                assert_eq!(
                    part_body.as_slice(),
                    &body[expected.first as usize..=expected.last as usize]
                );
            }
        }
    }

    #[test]
    fn multipart_plan_exact_bytes() {
        let plan = MultipartPlan::new(&[range(0, 1), range(5, 5)], 10, Some("text/plain"), "b");
        assert_eq!(
            plan.part_headers[0],
            Bytes::from_static(
                b"--b\r\nContent-Type: text/plain\r\nContent-Range: bytes 0-1/10\r\n\r\n"
            )
        );
        assert_eq!(
            plan.part_headers[1],
            Bytes::from_static(
                b"\r\n--b\r\nContent-Type: text/plain\r\nContent-Range: bytes 5-5/10\r\n\r\n"
            )
        );
        assert_eq!(plan.trailer, Bytes::from_static(b"\r\n--b--\r\n"));
        let expected_len =
            plan.part_headers.iter().map(Bytes::len).sum::<usize>() + 3 + plan.trailer.len();
        assert_eq!(plan.body_len, expected_len as u64);
        assert_eq!(plan.content_type(), "multipart/byteranges; boundary=b");
    }

    #[test]
    fn multipart_plan_drops_injected_content_type() {
        let plan = MultipartPlan::new(&[range(0, 0)], 1, Some("text/plain\r\nX-Evil: 1"), "b");
        assert_eq!(
            plan.part_headers[0],
            Bytes::from_static(b"--b\r\nContent-Range: bytes 0-0/1\r\n\r\n")
        );
    }

    #[test]
    fn multipart_content_type_quotes_when_needed() {
        let plan = MultipartPlan::new(&[range(0, 0)], 1, None, "a b");
        assert_eq!(
            plan.content_type(),
            "multipart/byteranges; boundary=\"a b\""
        );
    }

    /// Render specs back into a header value, as a client would write them.
    fn render_range_header(specs: &[ByteRangeSpec]) -> String {
        let elements: Vec<String> = specs
            .iter()
            .map(|spec| match *spec {
                ByteRangeSpec::FromTo { first, last } => format!("{first}-{last}"),
                ByteRangeSpec::From { first } => format!("{first}-"),
                ByteRangeSpec::Suffix { suffix_len } => format!("-{suffix_len}"),
            })
            .collect();
        format!("bytes={}", elements.join(", "))
    }

    /// Positions that are small relative to the lengths below most of the time, so specs hit the
    /// interesting edges (inside, at, and beyond the end), with occasional huge values.
    fn position() -> impl Strategy<Value = u64> {
        prop_oneof![
            8 => 0u64..2100,
            1 => any::<u64>(),
        ]
    }

    fn well_formed_spec() -> impl Strategy<Value = ByteRangeSpec> {
        prop_oneof![
            (position(), position()).prop_map(|(a, b)| from_to(a.min(b), a.max(b))),
            position().prop_map(from),
            position().prop_map(suffix),
        ]
    }

    proptest! {
        #[test]
        fn parse_range_header_never_panics(value in any::<String>()) {
            let _ = parse_range_header(&value);
        }

        #[test]
        fn parse_range_header_never_panics_on_near_misses(
            value in "[bB][yY][tT][eE][sS]=[0-9, \\-\t]{0,24}"
        ) {
            if let Some(specs) = parse_range_header(&value) {
                prop_assert!(!specs.is_empty());
                for spec in specs {
                    if let ByteRangeSpec::FromTo { first, last } = spec {
                        prop_assert!(first <= last);
                    }
                }
            }
        }

        #[test]
        fn range_header_round_trips(specs in prop::collection::vec(well_formed_spec(), 1..8)) {
            prop_assert_eq!(parse_range_header(&render_range_header(&specs)), Some(specs));
        }

        #[test]
        fn resolved_ranges_are_in_bounds_sorted_and_disjoint(
            specs in prop::collection::vec(well_formed_spec(), 0..12),
            complete_len in prop_oneof![4 => 0u64..2000, 1 => any::<u64>()],
        ) {
            match resolve_ranges(&specs, complete_len, usize::MAX) {
                RangeOutcome::Satisfiable(ranges) => {
                    prop_assert!(!ranges.is_empty());
                    for resolved in &ranges {
                        prop_assert!(resolved.first <= resolved.last);
                        prop_assert!(resolved.last < complete_len);
                    }
                    for pair in ranges.windows(2) {
                        // Strictly more than one past the previous end: sorted, disjoint, not adjacent.
                        prop_assert!(pair[1].first > pair[0].last + 1);
                    }
                }
                RangeOutcome::Unsatisfiable => {}
                RangeOutcome::TooManyRanges => prop_assert!(false, "limit was usize::MAX"),
            }
        }

        #[test]
        fn too_many_ranges_means_more_than_the_limit(
            specs in prop::collection::vec(well_formed_spec(), 0..12),
            complete_len in 0u64..2000,
            max_ranges in 0usize..6,
        ) {
            let unlimited = resolve_ranges(&specs, complete_len, usize::MAX);
            let limited = resolve_ranges(&specs, complete_len, max_ranges);
            match unlimited {
                RangeOutcome::Satisfiable(ranges) if ranges.len() > max_ranges => {
                    prop_assert_eq!(limited, RangeOutcome::TooManyRanges);
                }
                other => prop_assert_eq!(limited, other),
            }
        }

        #[test]
        fn content_range_round_trips(
            (first, last, complete_len) in (any::<u64>(), any::<u64>(), any::<u64>())
                .prop_filter("need at least one byte", |(_, _, complete_len)| *complete_len > 0)
                .prop_map(|(a, b, complete_len)| {
                    let a = a % complete_len;
                    let b = b % complete_len;
                    (a.min(b), a.max(b), complete_len)
                })
        ) {
            let formatted = format_content_range(range(first, last), complete_len);
            prop_assert_eq!(
                parse_content_range(&formatted),
                Some(ContentRange::Bytes { first, last, complete_len: Some(complete_len) })
            );
            let unsatisfied = format_unsatisfied_content_range(complete_len);
            prop_assert_eq!(
                parse_content_range(&unsatisfied),
                Some(ContentRange::Unsatisfied { complete_len })
            );
        }

        #[test]
        fn parse_content_range_never_panics(value in any::<String>()) {
            let _ = parse_content_range(&value);
        }

        #[test]
        fn resolved_union_equals_naive_union(
            specs in prop::collection::vec(well_formed_spec(), 0..10),
            complete_len in 0u64..=2000,
        ) {
            // The naive model: mark every byte each spec covers, clamped to the representation.
            let mut expected = vec![false; complete_len as usize];
            for spec in &specs {
                let (first, last_exclusive) = match *spec {
                    ByteRangeSpec::FromTo { first, last } => (first, last.saturating_add(1)),
                    ByteRangeSpec::From { first } => (first, u64::MAX),
                    ByteRangeSpec::Suffix { suffix_len } => {
                        (complete_len.saturating_sub(suffix_len), u64::MAX)
                    }
                };
                let first = first.min(complete_len);
                let last_exclusive = last_exclusive.min(complete_len);
                for covered in &mut expected[first as usize..last_exclusive.max(first) as usize] {
                    *covered = true;
                }
            }

            let mut actual = vec![false; complete_len as usize];
            match resolve_ranges(&specs, complete_len, usize::MAX) {
                RangeOutcome::Satisfiable(ranges) => {
                    for resolved in ranges {
                        for covered in &mut actual[resolved.first as usize..=resolved.last as usize] {
                            *covered = true;
                        }
                    }
                    prop_assert!(expected.iter().any(|covered| *covered));
                }
                RangeOutcome::Unsatisfiable => {
                    prop_assert!(expected.iter().all(|covered| !*covered));
                }
                RangeOutcome::TooManyRanges => prop_assert!(false, "limit was usize::MAX"),
            }
            prop_assert_eq!(actual, expected);
        }

        #[test]
        fn multipart_body_len_matches_rendering(
            specs in prop::collection::vec(well_formed_spec(), 1..6),
            complete_len in 1u64..300,
            with_type in any::<bool>(),
        ) {
            let body: Vec<u8> = (0..complete_len).map(|index| index as u8).collect();
            if let RangeOutcome::Satisfiable(ranges) = resolve_ranges(&specs, complete_len, usize::MAX) {
                let content_type = with_type.then_some("video/mp4");
                let plan = MultipartPlan::new(&ranges, complete_len, content_type, "3d6b6a416f9b5");
                let rendered = render_multipart(&plan, &ranges, &body);
                prop_assert_eq!(plan.body_len, rendered.len() as u64);
                let parts = parse_multipart(&rendered, "3d6b6a416f9b5");
                prop_assert_eq!(parts.len(), ranges.len());
                for ((_, _, part_body), expected) in parts.iter().zip(&ranges) {
                    prop_assert_eq!(
                        part_body.as_slice(),
                        &body[expected.first as usize..=expected.last as usize]
                    );
                }
            }
        }
    }
}
