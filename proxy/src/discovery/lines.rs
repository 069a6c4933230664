//! Splitting the NDJSON stream into snapshot lines, whatever the frame boundaries.

use bytes::{Bytes, BytesMut};

/// A snapshot line exceeded the configured cap.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a snapshot line is longer than {0} bytes")]
pub(super) struct LineTooLong(pub(super) usize);

/// Splits a byte stream into lines, whatever the frame boundaries.
#[derive(Debug)]
pub(super) struct LineBuffer {
    buf: BytesMut,
    /// Bytes of `buf` already known to hold no newline, so a long line is scanned once.
    scanned: usize,
    max: usize,
}

impl LineBuffer {
    pub(super) fn new(max: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            scanned: 0,
            max,
        }
    }

    pub(super) fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete line without its `\n` (or `\r\n`); blank lines are skipped.
    pub(super) fn next_line(&mut self) -> Result<Option<Bytes>, LineTooLong> {
        loop {
            let Some(i) = self.buf[self.scanned..].iter().position(|b| *b == b'\n') else {
                self.scanned = self.buf.len();
                if self.buf.len() > self.max {
                    return Err(LineTooLong(self.max));
                }
                return Ok(None);
            };
            let end = self.scanned + i;
            let mut line = self.buf.split_to(end + 1);
            self.scanned = 0;
            line.truncate(end);
            if line.last() == Some(&b'\r') {
                line.truncate(end - 1);
            }
            if line.len() > self.max {
                return Err(LineTooLong(self.max));
            }
            if !line.iter().all(u8::is_ascii_whitespace) {
                return Ok(Some(line.freeze()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(max: usize, frames: &[&[u8]]) -> Result<Vec<String>, LineTooLong> {
        let mut buf = LineBuffer::new(max);
        let mut out = Vec::new();
        for frame in frames {
            buf.extend(frame);
            while let Some(line) = buf.next_line()? {
                out.push(String::from_utf8(line.to_vec()).unwrap());
            }
        }
        Ok(out)
    }

    #[test]
    fn lines_across_frames() {
        assert_eq!(
            lines(100, &[b"{\"a\"", b":1}\n{\"b\":2}\n{", b"\"c\":3}", b"\n"]).unwrap(),
            ["{\"a\":1}", "{\"b\":2}", "{\"c\":3}"]
        );
        // CRLF, blank and whitespace-only lines (keep-alives) are tolerated.
        assert_eq!(lines(100, &[b"a\r\n\n \r\nb\n"]).unwrap(), ["a", "b"]);
        // An unterminated tail is not a line yet.
        assert_eq!(lines(100, &[b"a\nb"]).unwrap(), ["a"]);
        // One byte per frame.
        let text = b"{\"x\":[1,2,3]}\n{}\n";
        let frames: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(lines(100, &frames).unwrap(), ["{\"x\":[1,2,3]}", "{}"]);
    }

    #[test]
    fn line_cap() {
        assert_eq!(lines(4, &[b"1234\n"]).unwrap(), ["1234"]);
        assert_eq!(lines(4, &[b"1234\r\n"]).unwrap(), ["1234"]);
        assert_eq!(lines(4, &[b"12345\n"]), Err(LineTooLong(4)));
        // Caught while still unterminated, before it grows further.
        assert_eq!(lines(4, &[b"123", b"45"]), Err(LineTooLong(4)));
        // A long line split over many frames is scanned incrementally and still accepted.
        let long = vec![b'x'; 10_000];
        let mut frames: Vec<&[u8]> = long.chunks(7).collect();
        frames.push(b"\n");
        assert_eq!(lines(10_000, &frames).unwrap()[0].len(), 10_000);
    }

    proptest::proptest! {
        /// However the stream is cut into frames, the lines are those of the whole text.
        #[test]
        fn frames_do_not_change_the_lines(
            text in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::strategy::Just(b'\n'),
                    proptest::strategy::Just(b'\r'),
                    proptest::strategy::Just(b' '),
                    proptest::num::u8::ANY,
                ],
                0..300,
            ),
            cuts in proptest::collection::vec(0usize..300, 0..20),
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().filter(|c| *c <= text.len()).collect();
            cuts.sort_unstable();
            cuts.dedup();
            let mut frames = Vec::new();
            let mut at = 0;
            for c in cuts.into_iter().chain([text.len()]) {
                frames.push(&text[at..c]);
                at = c;
            }
            let mut buf = LineBuffer::new(1000);
            let mut got = Vec::new();
            for frame in frames {
                buf.extend(frame);
                while let Some(line) = buf.next_line().unwrap() {
                    got.push(line.to_vec());
                }
            }
            let complete = match text.iter().rposition(|b| *b == b'\n') {
                Some(i) => &text[..i + 1],
                None => &text[..0],
            };
            let want: Vec<Vec<u8>> = complete
                .split(|b| *b == b'\n')
                .map(|l| l.strip_suffix(b"\r").unwrap_or(l).to_vec())
                .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
                .collect();
            proptest::prop_assert_eq!(got, want);
        }
    }
}
