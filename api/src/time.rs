//! Times for people and log pipelines to read: RFC 3339 in UTC, without a date-time crate for
//! one formatting function.

use std::time::{Duration, SystemTime};

/// `2026-11-23T13:00:34Z`: for certificate validity and other times a person reads.
pub fn rfc3339(at: SystemTime) -> String {
    let (date, secs, _) = civil(at);
    format!("{date}T{secs}Z")
}

/// `2026-12-06T06:30:01.234Z`: for access logs and freshness, where seconds are too coarse.
pub fn rfc3339_millis(at: SystemTime) -> String {
    let (date, secs, since) = civil(at);
    format!("{date}T{secs}.{:03}Z", since.subsec_millis())
}

/// The date and the time of day, formatted, and the time since the epoch (a time before it
/// reads as the epoch).
fn civil(at: SystemTime) -> (String, String, Duration) {
    let since = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days to a civil date in the proleptic Gregorian calendar (Howard Hinnant's algorithm).
    let z = i64::try_from(days).unwrap_or(i64::MAX / 2) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        format!("{year:04}-{month:02}-{day:02}"),
        format!("{:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60),
        since,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_and_milliseconds() {
        let epoch = SystemTime::UNIX_EPOCH;
        assert_eq!(rfc3339(epoch), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_millis(epoch), "1970-01-01T00:00:00.000Z");
        let t = epoch + Duration::from_millis(1_796_538_601_234);
        assert_eq!(rfc3339(t), "2026-12-06T06:30:01Z");
        assert_eq!(rfc3339_millis(t), "2026-12-06T06:30:01.234Z");
        // A leap day, and the end of a century year that is not one.
        assert_eq!(
            rfc3339(epoch + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
        assert_eq!(
            rfc3339(epoch + Duration::from_secs(4_107_542_399)),
            "2100-02-28T23:59:59Z"
        );
        assert_eq!(
            rfc3339(epoch + Duration::from_secs(4_107_542_400)),
            "2100-03-01T00:00:00Z"
        );
        // Before the epoch reads as the epoch rather than failing.
        assert_eq!(
            rfc3339(epoch - Duration::from_secs(5)),
            "1970-01-01T00:00:00Z"
        );
    }
}
