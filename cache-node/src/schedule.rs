//! Time windows for work the node starts on its own (`[[prefill.schedule]]`): a daily window
//! such as `"01:00-05:00"` with an optional filter of week days, parsed once, and
//! [`ScheduledRuns`], the decision of when a scheduled run starts, starts again and ends.
//!
//! Everything here is pure: the time is an argument (seconds since the Unix epoch), so the tests
//! need not wait for 01:00. Windows are in **UTC**: a node in a container usually has no time
//! zone database, and UTC has no daylight-saving jumps that would skip or repeat a window.
//!
//! A window whose end is at or before its start crosses midnight (`"22:00-02:00"`); `"24:00"`
//! may end a window (`"00:00-24:00"` is the whole day). An occurrence belongs to the day it
//! starts on, so `days = ["tue"]` with `"22:00-02:00"` runs from Tuesday 22:00 to Wednesday
//! 02:00.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

const MINUTES_PER_DAY: u32 = 24 * 60;
const SECONDS_PER_DAY: u64 = 24 * 60 * 60;
/// The short names of the week days, Monday first (the bit order of [`Window`]'s day mask).
const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// One `[[prefill.schedule]]` table, as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    /// The URL-list file read in the window: one URL per line (`#` comments and blank lines
    /// skipped) or a JSON array of strings, as `POST /prefill` takes. It may be missing until
    /// an admin drops it into place.
    pub urls: PathBuf,
    /// The daily window, in UTC: `"01:00-05:00"`; an end at or before the start crosses
    /// midnight.
    pub window: String,
    /// The week days (`"mon"` .. `"sun"`, or full names) on which the window starts; empty for
    /// every day.
    pub days: Vec<String>,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            urls: PathBuf::new(),
            window: "01:00-05:00".to_owned(),
            days: Vec::new(),
        }
    }
}

/// One schedule, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// Its place among the `[[prefill.schedule]]` tables (0 for the first), which names it in
    /// logs and as a job's origin.
    pub index: usize,
    /// The URL-list file.
    pub urls: PathBuf,
    /// When it runs.
    pub window: Window,
}

impl ScheduleConfig {
    /// Checks table `index`; an error names the key (`prefill.schedule[0].window`).
    pub fn validate(&self, index: usize) -> Result<Schedule, (String, String)> {
        let key = |name: &str| format!("prefill.schedule[{index}].{name}");
        if self.urls.as_os_str().is_empty() {
            return Err((
                key("urls"),
                "is required: the URL-list file, e.g. \"/var/lib/outpost/prefill/patch-tuesday.txt\"".to_owned(),
            ));
        }
        let mut window = Window::parse(&self.window).map_err(|message| (key("window"), message))?;
        window.days = parse_days(&self.days).map_err(|message| (key("days"), message))?;
        Ok(Schedule {
            index,
            urls: self.urls.clone(),
            window,
        })
    }
}

/// A daily window in UTC, on some days of the week.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Minutes after midnight the window opens.
    start_minute: u32,
    /// Its length in minutes, 1 to a whole day.
    length_minutes: u32,
    /// Bit `d` set: the window opens on day `d` (0 = Monday); all set for every day.
    days: u8,
}

/// One occurrence of a window: from `start_unix` (inclusive) to `end_unix` (exclusive), in
/// seconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Occurrence {
    /// When it opens.
    pub start_unix: u64,
    /// When it closes.
    pub end_unix: u64,
}

impl Window {
    /// Parses `"HH:MM-HH:MM"` (every day; see [`ScheduleConfig::validate`] for the day filter).
    pub fn parse(text: &str) -> Result<Window, String> {
        let usage = "use \"HH:MM-HH:MM\" in UTC, e.g. \"01:00-05:00\"";
        let Some((start, end)) = text.split_once('-') else {
            return Err(format!("\"{text}\" is not a window; {usage}"));
        };
        let start_minute = parse_time(start.trim(), false).ok_or_else(|| {
            format!(
                "\"{text}\": \"{}\" is not a start time; {usage}",
                start.trim()
            )
        })?;
        let end_minute = parse_time(end.trim(), true)
            .ok_or_else(|| format!("\"{text}\": \"{}\" is not an end time; {usage}", end.trim()))?;
        if start_minute == end_minute % MINUTES_PER_DAY && end_minute != MINUTES_PER_DAY {
            return Err(format!(
                "\"{text}\" is empty: it ends when it starts; for the whole day use \"00:00-24:00\""
            ));
        }
        let length_minutes = if end_minute > start_minute {
            end_minute - start_minute
        } else {
            end_minute + MINUTES_PER_DAY - start_minute
        };
        Ok(Window {
            start_minute,
            length_minutes,
            days: 0x7f,
        })
    }

    /// The occurrence `now_unix` falls in, if any.
    pub fn occurrence_at(&self, now_unix: u64) -> Option<Occurrence> {
        let today = now_unix / SECONDS_PER_DAY;
        // Today's occurrence, or yesterday's when it crosses midnight.
        [Some(today), today.checked_sub(1)]
            .into_iter()
            .flatten()
            .filter(|day| self.days & (1 << weekday(*day)) != 0)
            .map(|day| {
                let start_unix = day * SECONDS_PER_DAY + u64::from(self.start_minute) * 60;
                Occurrence {
                    start_unix,
                    end_unix: start_unix + u64::from(self.length_minutes) * 60,
                }
            })
            .find(|occurrence| (occurrence.start_unix..occurrence.end_unix).contains(&now_unix))
    }
}

/// `"HH:MM"` as minutes after midnight; `"24:00"` only as an end.
fn parse_time(text: &str, is_end: bool) -> Option<u32> {
    let (hours, minutes) = text.split_once(':')?;
    if hours.is_empty() || hours.len() > 2 || minutes.len() != 2 {
        return None;
    }
    let hours: u32 = hours.parse().ok()?;
    let minutes: u32 = minutes.parse().ok()?;
    match (hours, minutes) {
        (24, 0) if is_end => Some(MINUTES_PER_DAY),
        (0..=23, 0..=59) => Some(hours * 60 + minutes),
        _ => None,
    }
}

/// The day mask of `days` (all days when empty).
fn parse_days(days: &[String]) -> Result<u8, String> {
    const FULL_NAMES: [&str; 7] = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    if days.is_empty() {
        return Ok(0x7f);
    }
    let mut mask = 0u8;
    for day in days {
        let lower = day.trim().to_ascii_lowercase();
        let position = DAY_NAMES
            .iter()
            .zip(FULL_NAMES)
            .position(|(short, full)| lower == *short || lower == full)
            .ok_or_else(|| {
                format!("\"{day}\" is not a week day; use \"mon\", \"tue\", \"wed\", \"thu\", \"fri\", \"sat\" or \"sun\"")
            })?;
        mask |= 1 << position;
    }
    Ok(mask)
}

/// The week day of a day counted from the epoch, 0 = Monday (1970-01-01 was a Thursday).
fn weekday(day: u64) -> u32 {
    ((day + 3) % 7) as u32
}

/// What a schedule should do now, from [`ScheduledRuns::step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Outside the window, nothing running: wait.
    Wait,
    /// Inside `occurrence`: read the URL file and ask [`ScheduledRuns::should_start`].
    Check(Occurrence),
    /// The window of the run of job `job` is over: cancel what is left of it.
    End {
        /// The job to cancel.
        job: u64,
    },
}

/// The last run of one schedule: in which occurrence, for which file content (a fingerprint,
/// also of a read error, so a missing file is reported once per window), with which job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    occurrence: Occurrence,
    fingerprint: [u8; 32],
    /// The job started, until its window ended.
    job: Option<u64>,
}

/// The state of one schedule: a run starts once per occurrence of its window, again in the same
/// occurrence only when the file's content changed, and its job is cancelled when the window
/// ends.
#[derive(Debug, Default)]
pub struct ScheduledRuns {
    last: Option<Run>,
}

impl ScheduledRuns {
    /// The job of the last run, while it may still be running.
    pub fn running_job(&self) -> Option<u64> {
        self.last.as_ref().and_then(|run| run.job)
    }

    /// What to do at `now_unix` under `window`.
    pub fn step(&mut self, window: &Window, now_unix: u64) -> Step {
        if let Some(run) = &mut self.last {
            let outside = !(run.occurrence.start_unix..run.occurrence.end_unix).contains(&now_unix);
            if let (true, Some(job)) = (outside, run.job) {
                run.job = None;
                return Step::End { job };
            }
        }
        match window.occurrence_at(now_unix) {
            Some(occurrence) => Step::Check(occurrence),
            None => Step::Wait,
        }
    }

    /// Whether content with `fingerprint`, read in `occurrence`, needs a run: not when the same
    /// content already ran in this occurrence.
    pub fn should_start(&self, occurrence: Occurrence, fingerprint: [u8; 32]) -> bool {
        !self
            .last
            .is_some_and(|run| run.occurrence == occurrence && run.fingerprint == fingerprint)
    }

    /// Records a run for `fingerprint` in `occurrence` that started `job` (`None`: nothing to
    /// start, such as an unreadable file). Returns the job of an earlier run in the same
    /// occurrence, which the new content replaces.
    pub fn started(
        &mut self,
        occurrence: Occurrence,
        fingerprint: [u8; 32],
        job: Option<u64>,
    ) -> Option<u64> {
        let replaced = self
            .last
            .filter(|run| run.occurrence == occurrence)
            .and_then(|run| run.job);
        self.last = Some(Run {
            occurrence,
            fingerprint,
            job,
        });
        replaced
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = SECONDS_PER_DAY;
    /// 2024-06-11 00:00 UTC, a Tuesday (Patch Tuesday).
    const TUESDAY: u64 = 1_718_064_000;

    fn at(day: u64, hours: u64, minutes: u64) -> u64 {
        day + hours * 3600 + minutes * 60
    }

    fn window(text: &str, days: &[&str]) -> Window {
        let config = ScheduleConfig {
            urls: "/x".into(),
            window: text.into(),
            days: days.iter().map(|day| day.to_string()).collect(),
        };
        config.validate(0).unwrap().window
    }

    #[test]
    fn the_reference_day_is_a_tuesday() {
        assert_eq!(weekday(TUESDAY / DAY), 1);
        assert_eq!(weekday(0), 3, "1970-01-01 was a Thursday");
    }

    #[test]
    fn windows_parse_or_say_why_not() {
        for (text, start, length) in [
            ("01:00-05:00", 60, 240),
            (" 1:30 - 2:00 ", 90, 30),
            ("22:00-02:00", 1320, 240),
            ("00:00-24:00", 0, 1440),
            ("23:59-00:00", 1439, 1),
            ("05:00-04:59", 300, 1439),
        ] {
            let parsed = Window::parse(text).unwrap();
            assert_eq!(
                (parsed.start_minute, parsed.length_minutes),
                (start, length),
                "{text}"
            );
        }
        for (text, says) in [
            ("01:00", "not a window"),
            ("1-5", "not a start time"),
            ("24:00-05:00", "not a start time"),
            ("01:00-25:00", "not an end time"),
            ("01:60-02:00", "not a start time"),
            ("01:00-02:0", "not an end time"),
            ("03:00-03:00", "empty"),
            ("", "not a window"),
        ] {
            let error = Window::parse(text).unwrap_err();
            assert!(error.contains(says), "{text}: {error}");
        }
    }

    #[test]
    fn errors_name_the_key() {
        let mut config = ScheduleConfig {
            urls: "/x".into(),
            window: "1am".into(),
            days: Vec::new(),
        };
        assert_eq!(
            config.validate(2).unwrap_err().0,
            "prefill.schedule[2].window"
        );
        config.window = "01:00-05:00".into();
        config.days = vec!["tuesday".into(), "Wed".into(), "noday".into()];
        let (key, message) = config.validate(0).unwrap_err();
        assert_eq!(key, "prefill.schedule[0].days");
        assert!(message.contains("noday"), "{message}");
        config.days = vec!["tues".into()];
        assert!(config.validate(0).is_err(), "neither short nor full");
        config.days.clear();
        config.urls = PathBuf::new();
        assert_eq!(
            config.validate(0).unwrap_err().0,
            "prefill.schedule[0].urls"
        );
    }

    #[test]
    fn occurrences_include_the_start_and_exclude_the_end() {
        let nightly = window("01:00-05:00", &[]);
        assert_eq!(nightly.occurrence_at(at(TUESDAY, 0, 59)), None);
        let occurrence = nightly.occurrence_at(at(TUESDAY, 1, 0)).unwrap();
        assert_eq!(occurrence.start_unix, at(TUESDAY, 1, 0));
        assert_eq!(occurrence.end_unix, at(TUESDAY, 5, 0));
        assert_eq!(nightly.occurrence_at(at(TUESDAY, 4, 59)), Some(occurrence));
        assert_eq!(nightly.occurrence_at(at(TUESDAY, 5, 0)), None);
    }

    #[test]
    fn a_window_crossing_midnight_belongs_to_the_day_it_starts() {
        let late = window("22:00-02:00", &["tue"]);
        let tuesday_night = late.occurrence_at(at(TUESDAY, 23, 0)).unwrap();
        assert_eq!(tuesday_night.start_unix, at(TUESDAY, 22, 0));
        assert_eq!(tuesday_night.end_unix, at(TUESDAY + DAY, 2, 0));
        // Wednesday 01:00 is still Tuesday's occurrence.
        assert_eq!(
            late.occurrence_at(at(TUESDAY + DAY, 1, 0)),
            Some(tuesday_night)
        );
        assert_eq!(late.occurrence_at(at(TUESDAY + DAY, 2, 0)), None);
        // Tuesday 01:00 would be Monday's occurrence, which the filter leaves out.
        assert_eq!(late.occurrence_at(at(TUESDAY, 1, 0)), None);
        assert_eq!(late.occurrence_at(at(TUESDAY + DAY, 23, 0)), None);
        // Every day: Tuesday 01:00 is Monday's.
        let every_day = window("22:00-02:00", &[]);
        assert_eq!(
            every_day
                .occurrence_at(at(TUESDAY, 1, 0))
                .unwrap()
                .start_unix,
            at(TUESDAY - DAY, 22, 0)
        );
        let whole_day = window("00:00-24:00", &["tuesday"]);
        assert!(whole_day.occurrence_at(at(TUESDAY, 0, 0)).is_some());
        assert!(whole_day.occurrence_at(at(TUESDAY, 23, 59)).is_some());
        assert!(whole_day.occurrence_at(at(TUESDAY + DAY, 0, 0)).is_none());
    }

    #[test]
    fn a_run_starts_once_per_window_unless_the_file_changes_and_ends_with_the_window() {
        let nightly = window("23:00-01:00", &[]);
        let mut runs = ScheduledRuns::default();
        let file = [1u8; 32];
        assert_eq!(runs.step(&nightly, at(TUESDAY, 22, 59)), Step::Wait);

        let Step::Check(occurrence) = runs.step(&nightly, at(TUESDAY, 23, 0)) else {
            panic!("inside the window");
        };
        assert!(runs.should_start(occurrence, file));
        assert_eq!(runs.started(occurrence, file, Some(7)), None);

        // After midnight, the same occurrence and the same file: nothing new.
        let Step::Check(same) = runs.step(&nightly, at(TUESDAY + DAY, 0, 30)) else {
            panic!("still inside");
        };
        assert_eq!(same, occurrence);
        assert!(!runs.should_start(same, file));

        // The file changed: a new run replaces job 7.
        let changed = [2u8; 32];
        assert!(runs.should_start(same, changed));
        assert_eq!(runs.started(same, changed, Some(8)), Some(7));

        // The window ends: job 8 is cancelled, once.
        assert_eq!(
            runs.step(&nightly, at(TUESDAY + DAY, 1, 0)),
            Step::End { job: 8 }
        );
        assert_eq!(runs.step(&nightly, at(TUESDAY + DAY, 1, 0)), Step::Wait);

        // The next night the same file runs again.
        let Step::Check(next) = runs.step(&nightly, at(TUESDAY + DAY, 23, 0)) else {
            panic!("the next night");
        };
        assert_ne!(next, occurrence);
        assert!(runs.should_start(next, changed));
        assert_eq!(runs.started(next, changed, Some(9)), None);
    }

    #[test]
    fn an_unreadable_file_is_reported_once_per_window() {
        let nightly = window("01:00-05:00", &[]);
        let mut runs = ScheduledRuns::default();
        let missing = [9u8; 32];
        let Step::Check(occurrence) = runs.step(&nightly, at(TUESDAY, 1, 0)) else {
            panic!("inside");
        };
        assert!(runs.should_start(occurrence, missing));
        runs.started(occurrence, missing, None);
        assert!(!runs.should_start(occurrence, missing));
        // Nothing to cancel at the end.
        assert_eq!(runs.step(&nightly, at(TUESDAY, 5, 0)), Step::Wait);
        // The file appears: it runs.
        assert!(runs.should_start(occurrence, [3u8; 32]));
    }
}
