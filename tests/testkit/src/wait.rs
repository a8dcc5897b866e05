//! Waiting for what happens in the background. A scenario often has to wait for an effect it
//! cannot await directly (a fill that finishes after its client left, files a background task
//! deletes, a tracker sweep), and [`eventually`] is the one way the tests do that: it looks at a
//! condition at a short interval until the condition holds, and fails the test once a deadline
//! has passed, saying what it waited for, how long it waited and, where the condition reports it,
//! what it saw last. So no wait is unbounded and every timeout reads the same way.
//!
//! - [`eventually`] takes a plain closure, for conditions on state the test can read at once.
//! - [`eventually_async`] takes an async closure, for conditions that ask something over the
//!   network (`/stats`, a tracker, a health check).
//! - [`eventually_every`] is [`eventually_async`] at a pace the caller picks, for polls whose
//!   attempts act on the system under test (a retried request that a throttle counts, an
//!   announcement that must be renewed at its own period), so the pace is part of the scenario.
//!
//! The clock is tokio's, so a wait in a test with a paused clock advances it instead of sleeping.

use std::fmt::Display;
use std::time::Duration;

/// How long [`eventually`] and [`eventually_async`] sleep between two looks at their condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// What a condition tells the wait each time it is looked at: whether it holds yet, with the
/// value the caller waited for when it does, and what it saw instead when it does not.
///
/// - `bool`: holds when `true`, with no value.
/// - `Option<T>`: holds when `Some(value)`, and the wait returns the value.
/// - `Result<T, E>`: holds when `Ok(value)`; the last `Err` is displayed in the timeout message
///   (it is formatted only then, so it may be costly to display).
pub trait Outcome {
    /// What the wait returns once the condition holds.
    type Value;
    /// What the condition saw while it did not hold.
    type Seen;

    /// The value when the condition holds, or what it saw when it does not.
    fn check(self) -> Result<Self::Value, Self::Seen>;

    /// What the timeout message says the condition saw last, if anything.
    fn describe(seen: &Self::Seen) -> Option<String>;
}

impl Outcome for bool {
    type Value = ();
    type Seen = ();

    fn check(self) -> Result<(), ()> {
        if self {
            Ok(())
        } else {
            Err(())
        }
    }

    fn describe(_: &()) -> Option<String> {
        None
    }
}

impl<T> Outcome for Option<T> {
    type Value = T;
    type Seen = ();

    fn check(self) -> Result<T, ()> {
        self.ok_or(())
    }

    fn describe(_: &()) -> Option<String> {
        None
    }
}

impl<T, E: Display> Outcome for Result<T, E> {
    type Value = T;
    type Seen = E;

    fn check(self) -> Result<T, E> {
        self
    }

    fn describe(seen: &E) -> Option<String> {
        Some(seen.to_string())
    }
}

/// Waits until `condition` holds, looking at it every [`POLL_INTERVAL`], and returns its value.
///
/// # Panics
///
/// When `condition` still does not hold once `deadline` has passed since the call: the message
/// names `what` was waited for and how long the wait took.
pub async fn eventually<O: Outcome>(
    what: &str,
    deadline: Duration,
    mut condition: impl FnMut() -> O,
) -> O::Value {
    // The same loop as `eventually_every`'s, kept apart so that the future of a plain wait is
    // `Send` and may run in a spawned task (an async closure's is not, in general).
    let started = tokio::time::Instant::now();
    loop {
        match condition().check() {
            Ok(value) => return value,
            Err(seen) => give_up_after(what, deadline, started, || O::describe(&seen)),
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Like [`eventually`], for a condition that has to await something (a request, say).
pub async fn eventually_async<O: Outcome>(
    what: &str,
    deadline: Duration,
    condition: impl AsyncFnMut() -> O,
) -> O::Value {
    eventually_every(what, deadline, POLL_INTERVAL, condition).await
}

/// Like [`eventually_async`], looking at `condition` every `interval`: for polls whose attempts
/// act on the system under test, so that their pace stays what the scenario says.
pub async fn eventually_every<O: Outcome>(
    what: &str,
    deadline: Duration,
    interval: Duration,
    mut condition: impl AsyncFnMut() -> O,
) -> O::Value {
    let started = tokio::time::Instant::now();
    loop {
        match condition().await.check() {
            Ok(value) => return value,
            Err(seen) => give_up_after(what, deadline, started, || O::describe(&seen)),
        }
        tokio::time::sleep(interval).await;
    }
}

/// Fails the test once `deadline` has passed since `started`, with what the condition saw last
/// (described only then).
fn give_up_after(
    what: &str,
    deadline: Duration,
    started: tokio::time::Instant,
    seen: impl FnOnce() -> Option<String>,
) {
    let waited = started.elapsed();
    if waited < deadline {
        return;
    }
    match seen() {
        Some(seen) => panic!(
            "timed out after {waited:?} (deadline {deadline:?}) waiting for: {what}; \
             last seen: {seen}"
        ),
        None => panic!("timed out after {waited:?} (deadline {deadline:?}) waiting for: {what}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn returns_once_a_background_effect_shows() {
        let done = Arc::new(AtomicBool::new(false));
        tokio::spawn({
            let done = done.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                done.store(true, Ordering::SeqCst);
            }
        });
        eventually(
            "the background task is done",
            Duration::from_secs(10),
            || done.load(Ordering::SeqCst),
        )
        .await;
    }

    #[tokio::test]
    async fn returns_the_value_of_the_look_that_succeeded() {
        let mut looks = 0;
        let value = eventually("the third look", Duration::from_secs(10), || {
            looks += 1;
            (looks == 3).then_some(looks * 10)
        })
        .await;
        assert_eq!(value, 30);
        assert_eq!(looks, 3, "no look after the condition held");
    }

    #[tokio::test]
    async fn an_async_condition_may_await_between_looks() {
        let looks = AtomicU32::new(0);
        let value: u32 = eventually_async("the fifth look", Duration::from_secs(10), async || {
            tokio::task::yield_now().await;
            let look = looks.fetch_add(1, Ordering::SeqCst) + 1;
            if look == 5 {
                Ok(look)
            } else {
                Err(format!("look {look}"))
            }
        })
        .await;
        assert_eq!(value, 5);
    }

    #[tokio::test]
    #[should_panic(expected = "waiting for: the impossible")]
    async fn a_condition_that_never_holds_fails_with_the_description() {
        eventually("the impossible", Duration::from_millis(50), || false).await;
    }

    // Looks at 0, 0.5, 1, 1.5 and 2 s on the paused clock: the fifth is the last.
    #[tokio::test(start_paused = true)]
    #[should_panic(
        expected = "timed out after 2s (deadline 2s) waiting for: a count of ten; last seen: 5 looks"
    )]
    async fn the_timeout_message_says_how_long_it_waited_and_what_it_saw_last() {
        let mut looks = 0;
        eventually_every(
            "a count of ten",
            Duration::from_secs(2),
            Duration::from_millis(500),
            async || {
                looks += 1;
                if looks == 10 {
                    Ok(())
                } else {
                    Err(format!("{looks} looks"))
                }
            },
        )
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_is_not_cut_short() {
        let started = tokio::time::Instant::now();
        let mut looks = 0;
        eventually("the look at 3 s", Duration::from_secs(5), || {
            looks += 1;
            started.elapsed() >= Duration::from_secs(3)
        })
        .await;
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        assert_eq!(looks, 301, "a look every 10 ms from 0 to 3 s");
    }
}
