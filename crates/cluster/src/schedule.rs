//! FT on demand: when a VM's schedule wants FT on (`tandem ft schedule NAME --on SPEC
//! [--off SPEC]`), parsed strictly and evaluated at a given instant.
//!
//! A SPEC is one of:
//! - a weekly instant, `DAYS HH:MM` (e.g. `Mon-Fri 08:00`), or a weekly window,
//!   `DAYS HH:MM-HH:MM` (e.g. `Mon-Fri 08:00-18:00`; an end before the start crosses
//!   midnight). DAYS: `Mon`..`Sun`, ranges (`Mon-Fri`, wrapping `Fri-Mon`), lists
//!   (`Sat,Sun`), or `daily`;
//! - cron: five fields `MIN HOUR DOM MON DOW`, or six with a leading seconds field
//!   (`SEC MIN HOUR DOM MON DOW`), each `*`, `N`, `A-B`, with `/STEP`, comma lists.
//!   Numbers only; DOW 0-7 (0 and 7 are Sunday). As in cron, when both DOM and DOW are
//!   restricted, a day matching either matches. The seconds field exists for what needs a
//!   finer grain than a minute (a test turning FT on and off within one minute).
//!
//! `--on WINDOW` alone: FT is on inside the windows, off outside. `--on INSTANT --off
//! INSTANT`: FT follows whichever fired last (looking back [`LOOKBACK_DAYS`]); neither
//! fired in that time: off.
//!
//! Invariant: evaluation is a pure function of the schedule and the instant, so that a
//! new master (or a verb showing the VM) reaches the same answer as the old one, with
//! nothing kept between passes.
//!
//! Time zone: a fixed offset from UTC (`UTC`, `UTC+02:00`, `UTC-05:30`), or `host`: the
//! time zone of the host evaluating it (the master's; the C library's `localtime_r`).

use serde::{Deserialize, Serialize};

/// How far back the last firing of an instant spec is looked for.
pub const LOOKBACK_DAYS: i64 = 8;
/// The longest SPEC accepted (it is stored in the VM's record).
pub const MAX_SPEC: usize = 200;

/// A VM's FT schedule as stored (the specs as the user wrote them: parsed again where
/// used, after being checked at the verb).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FtSchedule {
    pub on: String,
    #[serde(default)]
    pub off: Option<String>,
    /// `UTC` (default), `UTC+HH:MM`, `UTC-HH:MM` or `host`.
    #[serde(default = "utc")]
    pub tz: String,
}

impl FtSchedule {
    /// `on "SPEC", off "SPEC" (TZ)`, as the master's log and the CLI say it.
    pub fn describe(&self) -> String {
        let off = self
            .off
            .as_ref()
            .map(|o| format!(", off {o:?}"))
            .unwrap_or_default();
        format!("on {:?}{off} ({})", self.on, self.tz)
    }
}

fn utc() -> String {
    "UTC".into()
}

/// A schedule that does not parse, and why (one line).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

fn err<T>(s: impl Into<String>) -> Result<T, SpecError> {
    Err(SpecError(s.into()))
}

/// One cron field: the allowed values as a bit set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Field {
    bits: u64,
    /// Written as `*` (matters for DOM/DOW).
    star: bool,
}

impl Field {
    fn has(&self, v: u32) -> bool {
        v < 64 && self.bits & (1 << v) != 0
    }
}

/// A moment that recurs: cron fields (a weekly instant is one too).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Cron {
    sec: Field,
    min: Field,
    hour: Field,
    dom: Field,
    mon: Field,
    /// 0 = Sunday.
    dow: Field,
}

/// A weekly window: on the days, from `start` to `end` minutes after midnight (an end not
/// after the start ends the next day).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Window {
    days: u8,
    start: u32,
    end: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Spec {
    At(Cron),
    Window(Window),
}

/// A schedule, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    on: Spec,
    off: Option<Cron>,
    tz: Tz,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tz {
    Offset(i64),
    Host,
}

fn field(text: &str, lo: u32, hi: u32, what: &str) -> Result<Field, SpecError> {
    if text.is_empty() || text.len() > 64 {
        return err(format!("{what} field {text:?}: empty or too long"));
    }
    let num = |s: &str| -> Result<u32, SpecError> {
        match s.parse::<u32>() {
            Ok(n) if (lo..=hi).contains(&n) && !s.starts_with('+') => Ok(n),
            _ => err(format!("{what} field: {s:?} is not a number in {lo}-{hi}")),
        }
    };
    let mut bits = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let step = match s.parse::<u32>() {
                    Ok(n) if n >= 1 && n <= hi.max(1) && !s.starts_with('+') => n,
                    _ => return err(format!("{what} field: step {s:?} is not in 1-{hi}")),
                };
                (r, step)
            }
            None => (part, 1),
        };
        let (a, b) = if range == "*" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (num(a)?, num(b)?);
            if a > b {
                return err(format!("{what} field: range {range:?} runs backwards"));
            }
            (a, b)
        } else {
            let a = num(range)?;
            // `N/STEP` means from N to the end, as in cron.
            (a, if part.contains('/') { hi } else { a })
        };
        let mut v = a;
        while v <= b {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok(Field {
        bits,
        star: text == "*",
    })
}

fn cron(text: &str) -> Result<Cron, SpecError> {
    let f: Vec<&str> = text.split_whitespace().collect();
    let (sec, rest) = match f.len() {
        5 => ("0", &f[..]),
        6 => (f[0], &f[1..]),
        n => {
            return err(format!(
                "cron {text:?}: {n} fields; use 5 (MIN HOUR DOM MON DOW) or 6 (SEC first)"
            ));
        }
    };
    let mut dow = field(rest[4], 0, 7, "day-of-week")?;
    // 7 is Sunday too.
    if dow.has(7) {
        dow.bits = (dow.bits & !(1 << 7)) | 1;
    }
    Ok(Cron {
        sec: field(sec, 0, 59, "seconds")?,
        min: field(rest[0], 0, 59, "minute")?,
        hour: field(rest[1], 0, 23, "hour")?,
        dom: field(rest[2], 1, 31, "day-of-month")?,
        mon: field(rest[3], 1, 12, "month")?,
        dow,
    })
}

const DAY_NAMES: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

fn day(s: &str) -> Result<u32, SpecError> {
    let l = s.to_ascii_lowercase();
    DAY_NAMES
        .iter()
        .position(|d| *d == l)
        .map(|i| i as u32)
        .ok_or_else(|| SpecError(format!("{s:?} is not a day (Mon, Tue, ... Sun)")))
}

/// `Mon-Fri`, `Sat,Sun`, `daily`: a bit per day, bit 0 Sunday.
fn days(text: &str) -> Result<u8, SpecError> {
    if text.eq_ignore_ascii_case("daily") {
        return Ok(0x7f);
    }
    let mut bits = 0u8;
    for part in text.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day(a)?, day(b)?);
                let mut d = a;
                loop {
                    bits |= 1 << d;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => bits |= 1 << day(part)?,
        }
    }
    Ok(bits)
}

/// `HH:MM`, minutes after midnight.
fn clock(s: &str) -> Result<u32, SpecError> {
    let bad = || SpecError(format!("{s:?} is not a time HH:MM (00:00-23:59)"));
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    if h.len() != 2 || m.len() != 2 {
        return Err(bad());
    }
    let (h, m) = (
        h.parse::<u32>().map_err(|_| bad())?,
        m.parse::<u32>().map_err(|_| bad())?,
    );
    if h > 23 || m > 59 {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

fn spec(text: &str) -> Result<Spec, SpecError> {
    let text = text.trim();
    if text.is_empty() {
        return err("an empty SPEC: use e.g. 'Mon-Fri 08:00-18:00' or '0 8 * * 1-5'");
    }
    if text.len() > MAX_SPEC {
        return err(format!("a SPEC over {MAX_SPEC} characters"));
    }
    let words: Vec<&str> = text.split_whitespace().collect();
    // A weekly form starts with a day or `daily`; cron fields start with a digit or '*'.
    let weekly = words[0]
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic());
    if !weekly {
        return cron(text).map(Spec::At);
    }
    if words.len() != 2 {
        return err(format!(
            "{text:?}: a weekly SPEC is DAYS HH:MM or DAYS HH:MM-HH:MM (e.g. 'Mon-Fri 08:00-18:00')"
        ));
    }
    let d = days(words[0])?;
    match words[1].split_once('-') {
        Some((a, b)) => {
            let (start, end) = (clock(a)?, clock(b)?);
            if start == end {
                return err(format!("{text:?}: a window that starts when it ends"));
            }
            Ok(Spec::Window(Window {
                days: d,
                start,
                end,
            }))
        }
        None => {
            let m = clock(words[1])?;
            let one = |v: u32| Field {
                bits: 1 << v,
                star: false,
            };
            Ok(Spec::At(Cron {
                sec: one(0),
                min: one(m % 60),
                hour: one(m / 60),
                dom: Field {
                    bits: !0,
                    star: true,
                },
                mon: Field {
                    bits: !0,
                    star: true,
                },
                dow: Field {
                    bits: u64::from(d),
                    star: d == 0x7f,
                },
            }))
        }
    }
}

fn tz(text: &str) -> Result<Tz, SpecError> {
    if text.eq_ignore_ascii_case("host") {
        return Ok(Tz::Host);
    }
    if text == "UTC" {
        return Ok(Tz::Offset(0));
    }
    let bad = || {
        SpecError(format!(
            "time zone {text:?}: use UTC, UTC+HH:MM, UTC-HH:MM or host"
        ))
    };
    let rest = text.strip_prefix("UTC").ok_or_else(bad)?;
    let sign = match rest.chars().next() {
        Some('+') => 1,
        Some('-') => -1,
        _ => return Err(bad()),
    };
    let m = clock(&rest[1..]).map_err(|_| bad())?;
    if m > 14 * 60 {
        return Err(bad());
    }
    Ok(Tz::Offset(sign * i64::from(m) * 60))
}

impl FtSchedule {
    /// Check and parse: every error says what to write instead.
    pub fn parse(&self) -> Result<Parsed, SpecError> {
        let on = spec(&self.on).map_err(|e| SpecError(format!("--on: {e}")))?;
        let off = match (&on, &self.off) {
            (Spec::Window(_), Some(_)) => {
                return err("--on is a window (FT on inside it, off outside): --off is not needed");
            }
            (Spec::Window(_), None) => None,
            (Spec::At(_), None) => {
                return err(
                    "--on is an instant: give --off too (or make --on a window, DAYS HH:MM-HH:MM)",
                );
            }
            (Spec::At(_), Some(off)) => {
                match spec(off).map_err(|e| SpecError(format!("--off: {e}")))? {
                    Spec::At(c) => Some(c),
                    Spec::Window(_) => {
                        return err("--off: a window; --off is an instant (DAYS HH:MM or cron)");
                    }
                }
            }
        };
        if off.is_some() && self.off.as_deref().map(str::trim) == Some(self.on.trim()) {
            return err("--on and --off are the same instant");
        }
        Ok(Parsed {
            on,
            off,
            tz: tz(&self.tz)?,
        })
    }
}

/// `unix_ms` as a UTC date and time, `YYYY-MM-DD HH:MM:SSZ` (the timeline's lines).
pub fn utc_time(unix_ms: u64) -> String {
    let secs = (unix_ms / 1000) as i64;
    let (y, m, d) = civil(secs.div_euclid(86_400));
    let t = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        t / 3600,
        t / 60 % 60,
        t % 60
    )
}

/// A civil date from days since 1970-01-01 (proleptic Gregorian): (year, month 1-12,
/// day 1-31).
fn civil(days: i64) -> (i64, u32, u32) {
    // Eras of 400 years (146097 days), counted from 0000-03-01.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The host's offset from UTC at `unix` seconds.
fn host_offset(unix: i64) -> i64 {
    let t = unix as libc::time_t;
    // SAFETY: `libc::tm` is a plain C struct of integers and a pointer, for which all
    // zeroes is a valid value (a null zone name).
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: localtime_r reads `t` and writes only into `tm`, both locals we own; it is
    // the reentrant form (no shared static buffer).
    let r = unsafe { libc::localtime_r(&t, &mut tm) };
    if r.is_null() { 0 } else { tm.tm_gmtoff }
}

impl Cron {
    /// The day (local days since the epoch) matches.
    fn day_matches(&self, days: i64) -> bool {
        let (_, mon, dom) = civil(days);
        let dow = (days + 4).rem_euclid(7) as u32;
        if !self.mon.has(mon) {
            return false;
        }
        match (self.dom.star, self.dow.star) {
            (false, false) => self.dom.has(dom) || self.dow.has(dow),
            _ => self.dom.has(dom) && self.dow.has(dow),
        }
    }

    /// The last local second at or before `t` this fires, within the lookback.
    fn last(&self, t: i64) -> Option<i64> {
        let first_minute = t.div_euclid(60);
        let mut day_cache: Option<(i64, bool)> = None;
        for back in 0..(LOOKBACK_DAYS * 1440) {
            let minute = first_minute - back;
            let days = minute.div_euclid(1440);
            let in_day = minute.rem_euclid(1440) as u32;
            let ok = match day_cache {
                Some((d, ok)) if d == days => ok,
                _ => {
                    let ok = self.day_matches(days);
                    day_cache = Some((days, ok));
                    ok
                }
            };
            if !ok || !self.hour.has(in_day / 60) || !self.min.has(in_day % 60) {
                continue;
            }
            let top = if back == 0 {
                t.rem_euclid(60) as u32
            } else {
                59
            };
            if let Some(s) = (0..=top).rev().find(|s| self.sec.has(*s)) {
                return Some(minute * 60 + i64::from(s));
            }
        }
        None
    }
}

impl Window {
    fn inside(&self, t: i64) -> bool {
        let days = t.div_euclid(86_400);
        let minute = (t.rem_euclid(86_400) / 60) as u32;
        let starts_on = |d: i64| self.days & (1 << (d + 4).rem_euclid(7)) != 0;
        if self.start < self.end {
            starts_on(days) && minute >= self.start && minute < self.end
        } else {
            // Crosses midnight: today's from its start, or yesterday's until its end.
            (starts_on(days) && minute >= self.start) || (starts_on(days - 1) && minute < self.end)
        }
    }
}

impl Parsed {
    /// Whether FT should be on at `unix` seconds (UTC).
    pub fn wants_on(&self, unix: i64) -> bool {
        let local = unix
            + match self.tz {
                Tz::Offset(o) => o,
                Tz::Host => host_offset(unix),
            };
        match (&self.on, &self.off) {
            (Spec::Window(w), _) => w.inside(local),
            (Spec::At(on), Some(off)) => match (on.last(local), off.last(local)) {
                (Some(a), Some(b)) => a > b,
                (Some(_), None) => true,
                _ => false,
            },
            (Spec::At(_), None) => false,
        }
    }
}

/// Whether a schedule wants FT on now (a schedule that no longer parses: off).
pub fn wants_on_now(s: &FtSchedule) -> bool {
    let now = (crate::model::now_ms() / 1000) as i64;
    s.parse().is_ok_and(|p| p.wants_on(now))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(on: &str, off: Option<&str>) -> Result<Parsed, SpecError> {
        FtSchedule {
            on: on.into(),
            off: off.map(str::to_string),
            tz: "UTC".into(),
        }
        .parse()
    }

    /// 2026-11-23 was a Monday.
    fn at(day: i64, h: i64, m: i64, s: i64) -> i64 {
        let monday = 20_780; // days from 1970-01-01 to 2026-11-23
        (monday + day) * 86_400 + h * 3600 + m * 60 + s
    }

    #[test]
    fn utc_times_read_as_a_calendar_does() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00Z");
        // 2026-11-26 12:58:03.5 UTC.
        assert_eq!(utc_time(1_795_697_883_500), "2026-11-26 12:58:03Z");
        assert_eq!(utc_time(951_782_400_000), "2000-02-29 00:00:00Z");
    }

    #[test]
    fn civil_dates_and_weekdays() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(20_780), (2026, 11, 23));
        assert_eq!(civil(11_016), (2000, 2, 29));
        assert_eq!((20_780 + 4) % 7, 1, "a Monday");
    }

    #[test]
    fn weekly_windows() {
        let p = sched("Mon-Fri 08:00-18:00", None).unwrap();
        assert!(p.wants_on(at(0, 8, 0, 0)));
        assert!(p.wants_on(at(4, 17, 59, 59)));
        assert!(!p.wants_on(at(4, 18, 0, 0)));
        assert!(!p.wants_on(at(0, 7, 59, 59)));
        assert!(!p.wants_on(at(5, 12, 0, 0)), "Saturday");
        let night = sched("Fri 22:00-06:00", None).unwrap();
        assert!(night.wants_on(at(4, 23, 0, 0)));
        assert!(night.wants_on(at(5, 5, 59, 0)), "Saturday morning");
        assert!(!night.wants_on(at(5, 6, 0, 0)));
        assert!(!night.wants_on(at(3, 23, 0, 0)), "Thursday");
        let tz = FtSchedule {
            on: "Mon 08:00-09:00".into(),
            off: None,
            tz: "UTC+02:00".into(),
        }
        .parse()
        .unwrap();
        assert!(tz.wants_on(at(0, 6, 30, 0)), "08:30 at UTC+2");
        assert!(!tz.wants_on(at(0, 8, 30, 0)));
    }

    #[test]
    fn instants_follow_the_last_firing() {
        let p = sched("Mon-Fri 08:00", Some("Mon-Fri 18:00")).unwrap();
        assert!(p.wants_on(at(0, 9, 0, 0)));
        assert!(!p.wants_on(at(0, 19, 0, 0)));
        assert!(!p.wants_on(at(5, 10, 0, 0)), "Friday's off fired last");
        let c = sched("*/2 * * * *", Some("1-59/2 * * * *")).unwrap();
        assert!(c.wants_on(at(0, 10, 4, 30)));
        assert!(!c.wants_on(at(0, 10, 5, 30)));
        let s = sched("0 * * * * *", Some("30 * * * * *")).unwrap();
        assert!(s.wants_on(at(2, 3, 4, 0)));
        assert!(s.wants_on(at(2, 3, 4, 29)));
        assert!(!s.wants_on(at(2, 3, 4, 30)));
        assert!(!s.wants_on(at(2, 3, 4, 59)));
        // DOM and DOW both restricted: either matches (the 1st, or a Sunday).
        let d = sched("0 0 1 * 0", Some("0 12 * * *")).unwrap();
        assert!(d.wants_on(at(6, 1, 0, 0)), "Sunday");
        assert!(!d.wants_on(at(5, 1, 0, 0)), "Saturday, not the 1st");
        // Never fired in the lookback: off.
        let never = sched("0 0 30 2 *", Some("0 1 30 2 *")).unwrap();
        assert!(!never.wants_on(at(0, 0, 0, 0)));
    }

    #[test]
    fn bad_specs_say_why() {
        for (on, off, says) in [
            ("", None, "empty"),
            ("Mon-Fri 08:00", None, "give --off"),
            ("Mon-Fri 08:00-18:00", Some("Mon 19:00"), "not needed"),
            ("Mon-Fri 8:00-18:00", None, "HH:MM"),
            ("Mon-Fri 08:00-24:00", None, "HH:MM"),
            ("Mon-Fryday 08:00", Some("Mon 09:00"), "not a day"),
            ("Mon 08:00-08:00", None, "starts when it ends"),
            ("* * * *", Some("* * * * *"), "4 fields"),
            ("60 * * * *", Some("0 * * * *"), "minute field"),
            ("5-1 * * * *", Some("0 * * * *"), "backwards"),
            ("*/0 * * * *", Some("0 * * * *"), "step"),
            ("* * * * 8", Some("0 * * * *"), "day-of-week"),
            ("0 8 * * *", Some("0 8 * * *"), "same instant"),
            ("0 8 * * *", Some("Mon 08:00-09:00"), "a window"),
            ("mon-fri", None, "weekly SPEC"),
            ("+1 * * * *", Some("0 * * * *"), "minute"),
        ] {
            match sched(on, off) {
                Err(SpecError(m)) => assert!(m.contains(says), "{on:?}: {m}"),
                Ok(_) => panic!("{on:?} {off:?} accepted"),
            }
        }
        let long = "1,".repeat(150) + "1 * * * *";
        assert!(sched(&long, Some("0 * * * *")).is_err());
        for bad in ["UTC+", "GMT", "UTC+15:00", "UTC+1:00", "utc+01:00x"] {
            let s = FtSchedule {
                on: "Mon 08:00-09:00".into(),
                off: None,
                tz: bad.into(),
            };
            assert!(s.parse().is_err(), "{bad}");
        }
    }
}
