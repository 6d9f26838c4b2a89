//! HIPAA Safe Harbor generalisation rules (45 CFR §164.514(b)(2)) for the values a node
//! keeps: ages, ZIP codes and dates. Direct identifiers are not generalised but removed
//! (see [`super::FieldClass`]).

use std::fmt;
use std::path::Path;

/// The oldest age Safe Harbor lets through as itself; older ages become [`AGE_CAP`].
pub const OLDEST_EXACT_AGE: f64 = 89.0;
/// "90 or older".
pub const AGE_CAP: f64 = 90.0;

/// The restricted three-digit ZIP areas shipped with medfed (with their source).
pub const RESTRICTED_ZIP3: &str = include_str!("../../data/restricted-zip3.txt");

/// Ages over 89 are aggregated into one category, "90 or older", written as 90.
pub fn generalise_age(age: f64) -> f64 {
    if age > OLDEST_EXACT_AGE { AGE_CAP } else { age }
}

/// Three-digit ZIP areas of 20,000 or fewer people.
#[derive(Debug, Clone)]
pub struct RestrictedZip3(Box<[bool; 1000]>);

impl RestrictedZip3 {
    /// The list shipped with medfed.
    pub fn shipped() -> RestrictedZip3 {
        RestrictedZip3::parse(RESTRICTED_ZIP3).expect("the shipped ZIP3 list is valid")
    }

    /// A site's own list (e.g. from newer Census data), one prefix per line.
    pub fn load(path: &Path) -> Result<RestrictedZip3, String> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            format!(
                "cannot read the restricted ZIP3 list {}: {e}",
                path.display()
            )
        })?;
        RestrictedZip3::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses a list of three-digit ZIP prefixes, one a line (blank lines and `#` comments
    /// allowed); the error names the first bad line.
    pub fn parse(text: &str) -> Result<RestrictedZip3, String> {
        let mut set = Box::new([false; 1000]);
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line.len() != 3 || !line.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!(
                    "line {}: {line:?} is not a three-digit ZIP prefix",
                    i + 1
                ));
            }
            set[zip3_index(line.as_bytes())] = true;
        }
        Ok(RestrictedZip3(set))
    }

    /// Whether the three-digit prefix `zip3` is a restricted area.
    pub fn contains(&self, zip3: &str) -> bool {
        zip3.len() == 3
            && zip3.bytes().all(|b| b.is_ascii_digit())
            && self.0[zip3_index(zip3.as_bytes())]
    }

    /// A US ZIP code ("02139", "02139-4307", "021394307") generalised to its first three
    /// digits, or "000" for a restricted area.
    pub fn generalise(&self, zip: &str) -> Result<String, String> {
        self.generalise_digits(zip)
            .map(|d| d.iter().map(|b| char::from(*b)).collect())
            .map_err(str::to_string)
    }

    /// [`RestrictedZip3::generalise`]'s three digits, as ASCII bytes (no allocation).
    pub fn generalise_digits(&self, zip: &str) -> Result<[u8; 3], &'static str> {
        // The digits once the dashes are left out: 5 or 9 of them, and nothing else.
        let (mut count, mut first) = (0usize, [0u8; 3]);
        for b in zip.trim().bytes().filter(|b| *b != b'-') {
            if !b.is_ascii_digit() {
                return Err(NOT_A_ZIP);
            }
            if let Some(slot) = first.get_mut(count) {
                *slot = b;
            }
            count += 1;
        }
        if !(count == 5 || count == 9) {
            return Err(NOT_A_ZIP);
        }
        Ok(if self.0[zip3_index(&first)] {
            *b"000"
        } else {
            first
        })
    }
}

const NOT_A_ZIP: &str = "not a 5- or 9-digit US ZIP code";

/// The number of three ASCII digits.
fn zip3_index(digits: &[u8]) -> usize {
    digits
        .iter()
        .take(3)
        .fold(0, |n, d| n * 10 + usize::from(d.wrapping_sub(b'0')) % 10)
}

/// A calendar date (proleptic Gregorian).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Date {
    /// The year.
    pub year: i32,
    /// The month, 1 to 12.
    pub month: u32,
    /// The day of the month, from 1.
    pub day: u32,
}

impl fmt::Display for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

fn is_leap(year: i32) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i32, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(year) => 29,
        _ => 28,
    }
}

/// Why a text is not a date. It does not quote the text (a date of birth is an identifier):
/// callers that may show it, such as a config error, add it themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DateError {
    /// Not of the form `YYYY-MM-DD`.
    #[error("not a date (expected YYYY-MM-DD)")]
    NotADate,
    /// `YYYY-MM-DD` but no such day (e.g. February 30).
    #[error("not a day of the calendar")]
    NotACalendarDay,
}

impl Date {
    /// Parses `YYYY-MM-DD` (a FHIR `date`; a time part after `T` is ignored).
    pub fn parse(s: &str) -> Result<Date, DateError> {
        let bad = || DateError::NotADate;
        // Most dates are exactly YYYY-MM-DD: read at once (the same numbers as below).
        let b = s.as_bytes();
        let digits = |r: std::ops::Range<usize>| {
            b[r].iter().try_fold(0u32, |n, c| {
                c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
            })
        };
        let fixed = (b.len() == 10 && b[4] == b'-' && b[7] == b'-')
            .then(|| Some((digits(0..4)?, digits(5..7)?, digits(8..10)?)))
            .flatten();
        let (year, month, day) = match fixed {
            Some((y, m, d)) => (y as i32, m, d),
            None => {
                let s = s.trim();
                let day_part = s.split('T').next().unwrap_or(s);
                let mut it = day_part.split('-');
                let (Some(y), Some(m), Some(d), None) =
                    (it.next(), it.next(), it.next(), it.next())
                else {
                    return Err(bad());
                };
                if y.len() != 4 || m.len() != 2 || d.len() != 2 {
                    return Err(bad());
                }
                (
                    y.parse::<i32>().map_err(|_| bad())?,
                    m.parse::<u32>().map_err(|_| bad())?,
                    d.parse::<u32>().map_err(|_| bad())?,
                )
            }
        };
        if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
            return Err(DateError::NotACalendarDay);
        }
        Ok(Date { year, month, day })
    }

    /// Days since 1970-01-01 (the civil-from-days algorithm of H. Hinnant).
    pub fn to_days(self) -> i64 {
        let y = i64::from(self.year) - i64::from(self.month <= 2);
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let m = i64::from(self.month);
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(self.day) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    /// The date `days` days after 1970-01-01 (negative: before), the inverse of
    /// [`Date::to_days`].
    pub fn from_days(days: i64) -> Date {
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
        Date { year, month, day }
    }

    /// The date `days` days later (earlier if negative).
    pub fn shifted(self, days: i64) -> Date {
        Date::from_days(self.to_days() + days)
    }

    /// Whole years from `self` (a birth date) to `on`.
    pub fn years_until(self, on: Date) -> i32 {
        let mut years = on.year - self.year;
        if (on.month, on.day) < (self.month, self.day) {
            years -= 1;
        }
        years
    }
}

/// A birth date reduced to what Safe Harbor allows: the year, except that a year implying
/// an age over 89 on `on` is aggregated into the "90 or older" category, written as the
/// latest birth year of that category (`on.year - 90`).
pub fn generalise_birth_date(birth: Date, on: Date) -> i32 {
    if f64::from(birth.years_until(on)) > OLDEST_EXACT_AGE {
        on.year - AGE_CAP as i32
    } else {
        birth.year
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_over_89_become_90() {
        assert_eq!(generalise_age(89.0), 89.0);
        assert_eq!(generalise_age(89.9), 90.0);
        assert_eq!(generalise_age(90.0), 90.0);
        assert_eq!(generalise_age(104.0), 90.0);
        assert_eq!(generalise_age(0.5), 0.5);
    }

    #[test]
    fn dates_read_at_once_read_as_the_general_path_reads_them() {
        // A trailing space takes the general path (trim, split): the same date or error.
        let mut state = 7u64;
        for _ in 0..50_000 {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            let pick = |shift: u32, of: &[u8]| of[(state >> shift) as usize % of.len()];
            let digit = b"0123456789";
            let text: Vec<u8> = (0..10)
                .map(|i| match i {
                    4 | 7 => pick(60, b"--------/"),
                    _ => pick(
                        4 * i as u32 + 8,
                        if i == 9 { b"0123456789x" } else { digit },
                    ),
                })
                .collect();
            let text = String::from_utf8(text).unwrap();
            assert_eq!(
                Date::parse(&text),
                Date::parse(&format!("{text} ")),
                "{text:?}"
            );
        }
    }

    #[test]
    fn zip_codes_keep_three_digits_and_restricted_areas_become_000() {
        let list = RestrictedZip3::shipped();
        assert_eq!(
            list.0.iter().filter(|r| **r).count(),
            17,
            "the 17 areas of 67 FR 53233"
        );
        assert_eq!(list.generalise("02139").unwrap(), "021");
        assert_eq!(list.generalise("02139-4307").unwrap(), "021");
        assert_eq!(
            list.generalise("036 01").err(),
            Some("not a 5- or 9-digit US ZIP code".into())
        );
        // Every restricted prefix, and its neighbours which are not restricted.
        for zip3 in [
            "036", "059", "063", "102", "203", "556", "692", "790", "821", "823", "830", "831",
            "878", "879", "884", "890", "893",
        ] {
            assert_eq!(
                list.generalise(&format!("{zip3}42")).unwrap(),
                "000",
                "{zip3}"
            );
        }
        assert_eq!(list.generalise("03701").unwrap(), "037");
        assert_eq!(list.generalise("89201").unwrap(), "892");
        assert!(list.generalise("1234").is_err());
        assert!(list.generalise("ABCDE").is_err());
        assert!(list.generalise("").is_err());
    }

    #[test]
    fn a_site_list_is_checked_line_by_line() {
        assert_eq!(
            RestrictedZip3::parse("# mine\n036\n12\n").err(),
            Some("line 3: \"12\" is not a three-digit ZIP prefix".into())
        );
        let own = RestrictedZip3::parse("123\n").unwrap();
        assert_eq!(own.generalise("12345").unwrap(), "000");
        assert_eq!(own.generalise("03601").unwrap(), "036");
    }

    #[test]
    fn dates_round_trip_through_day_numbers_including_leap_days() {
        assert_eq!(Date::parse("1970-01-01").unwrap().to_days(), 0);
        assert_eq!(Date::parse("2000-03-01").unwrap().to_days(), 11_017);
        let mut d = Date::parse("1895-01-01").unwrap().to_days();
        let end = Date::parse("2105-12-31").unwrap().to_days();
        let mut previous = Date::from_days(d - 1);
        while d <= end {
            let date = Date::from_days(d);
            assert!(date > previous);
            assert_eq!(Date::parse(&date.to_string()).unwrap(), date);
            assert_eq!(date.to_days(), d);
            previous = date;
            d += 1;
        }
        assert!(Date::parse("2024-02-29").is_ok());
        assert_eq!(
            Date::parse("2023-02-29").err(),
            Some(DateError::NotACalendarDay)
        );
        assert_eq!(
            Date::parse("29/02/2024").err().map(|e| e.to_string()),
            Some("not a date (expected YYYY-MM-DD)".into())
        );
        assert!(
            Date::parse("1900-02-29").is_err(),
            "1900 was not a leap year"
        );
        assert!(Date::parse("2000-02-29").is_ok(), "2000 was");
        assert!(Date::parse("2024-13-01").is_err());
        assert!(Date::parse("24-01-01").is_err());
        assert_eq!(Date::parse("2024-02-29T10:30:00Z").unwrap().day, 29);
    }

    #[test]
    fn shifting_preserves_intervals_across_leap_days() {
        let a = Date::parse("2024-02-28").unwrap();
        let b = Date::parse("2024-03-01").unwrap();
        assert_eq!(b.to_days() - a.to_days(), 2);
        for shift in [-400, -365, -1, 1, 29, 365, 366] {
            let (sa, sb) = (a.shifted(shift), b.shifted(shift));
            assert_eq!(sb.to_days() - sa.to_days(), 2, "shift {shift}");
        }
        assert_eq!(
            Date::parse("2024-02-29").unwrap().shifted(365).to_string(),
            "2025-02-28"
        );
        assert_eq!(
            Date::parse("2023-03-01").unwrap().shifted(-1).to_string(),
            "2023-02-28"
        );
    }

    #[test]
    fn birth_dates_keep_the_year_unless_the_age_is_over_89() {
        let on = Date::parse("2026-06-15").unwrap();
        // 89 on the day: the year stays.
        assert_eq!(
            generalise_birth_date(Date::parse("1936-06-16").unwrap(), on),
            1936
        );
        assert_eq!(
            generalise_birth_date(Date::parse("1937-01-01").unwrap(), on),
            1937
        );
        // 90 on the day (born 1936-06-15) and older: "90 or older", written as 1936.
        assert_eq!(
            generalise_birth_date(Date::parse("1936-06-15").unwrap(), on),
            1936
        );
        assert_eq!(
            generalise_birth_date(Date::parse("1920-02-29").unwrap(), on),
            1936
        );
        // A leap-day birthday counts from 1 March in common years.
        let leap = Date::parse("1936-02-29").unwrap();
        assert_eq!(leap.years_until(Date::parse("2026-02-28").unwrap()), 89);
        assert_eq!(leap.years_until(Date::parse("2026-03-01").unwrap()), 90);
    }
}
