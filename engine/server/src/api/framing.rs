//! Reading one line of at most `limit` bytes from a buffered stream. An over-long line is
//! discarded up to its newline (without ever holding more than `limit` bytes), so one client
//! cannot make the daemon buffer without bound.

use std::io;

use tokio::io::AsyncBufReadExt;

/// What [`read_line_limited`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A complete line within the limit is in the buffer (without its newline).
    Complete,
    /// A line over the limit was skipped.
    TooLong,
    /// End of input.
    End,
}

/// Read the next line into `buf` (cleared first).
pub async fn read_line_limited<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    limit: usize,
) -> io::Result<Line> {
    buf.clear();
    let mut too_long = false;
    loop {
        let available = r.fill_buf().await?;
        if available.is_empty() {
            return Ok(match (buf.is_empty(), too_long) {
                (_, true) => Line::TooLong,
                (true, false) => Line::End,
                (false, false) => Line::Complete,
            });
        }
        let (chunk, found) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], Some(i)),
            None => (available, None),
        };
        if !too_long {
            if buf.len() + chunk.len() > limit {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(chunk);
            }
        }
        match found {
            Some(i) => {
                r.consume(i + 1);
                return Ok(if too_long {
                    Line::TooLong
                } else {
                    Line::Complete
                });
            }
            None => {
                let n = available.len();
                r.consume(n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn lines_within_and_over_the_limit() {
        let input: &[u8] = b"short\nthis one is too long\n\nlast";
        let mut r = tokio::io::BufReader::with_capacity(4, input);
        let mut buf = Vec::new();
        let mut got = vec![];
        loop {
            let l = read_line_limited(&mut r, &mut buf, 8).await.unwrap();
            if l == Line::End {
                break;
            }
            got.push((l, String::from_utf8(buf.clone()).unwrap()));
        }
        assert_eq!(
            got,
            vec![
                (Line::Complete, "short".into()),
                (Line::TooLong, String::new()),
                (Line::Complete, String::new()),
                (Line::Complete, "last".into()),
            ]
        );
    }
}
