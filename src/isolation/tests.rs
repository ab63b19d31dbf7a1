//! The gate as the worker uses it, on tokio's paused clock.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;

use super::*;
use crate::retry::{CallError, ErrorClass};

fn settings() -> GateSettings {
    GateSettings {
        call_wait: Duration::from_millis(100),
        limiter_max_wait: Duration::from_secs(5),
        max_pause: Duration::from_secs(60),
        breaker: BreakerSettings {
            failures: 3,
            cool_down: Duration::from_secs(10),
            max_cool_down: Duration::from_secs(60),
        },
        concurrency: AimdSettings {
            floor: 1,
            ceiling: 8,
            initial: 2,
            decrease: 0.5,
            latency_rise: 2.0,
            latency_slack: Duration::from_millis(50),
            adaptive: true,
        },
        rate_limit: Vec::new(),
    }
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(300)
}

fn ok() -> Result<(), CallError> {
    Ok(())
}

fn status(code: u16, retry_after: Option<Duration>) -> Result<(), CallError> {
    let mut e = CallError::new(ErrorClass::Retryable, format!("HTTP {code}"));
    e.http_status = Some(code);
    e.retry_after = retry_after;
    Err(e)
}

fn transport() -> Result<(), CallError> {
    Err(CallError::new(ErrorClass::Ambiguous, "call timed out"))
}

#[tokio::test(start_paused = true)]
async fn a_429_with_retry_after_pauses_every_call_until_then() {
    let gate = Gate::new("p", settings());
    let permit = gate.admit(far()).await.unwrap();
    permit.record(&status(429, Some(Duration::from_secs(2))));
    let refusal = gate.admit(far()).await.err().expect("paused");
    assert_eq!(refusal.reason, "paused");
    assert_eq!(refusal.retry_in, Duration::from_secs(2));
    tokio::time::advance(Duration::from_millis(1950)).await;
    // Within the short wait allowed: waited out, not refused.
    let before = Instant::now();
    let permit = gate.admit(far()).await.unwrap();
    assert_eq!(Instant::now() - before, Duration::from_millis(50));
    permit.record(&ok());
    // A 429 without a wait named, or an absurd one, is bounded.
    gate.admit(far()).await.unwrap().record(&status(429, None));
    assert!(
        gate.admit(far()).await.is_ok(),
        "no pause without Retry-After"
    );
    gate.admit(far())
        .await
        .unwrap()
        .record(&status(420, Some(Duration::from_secs(86_400))));
    let refusal = gate.admit(far()).await.err().unwrap();
    assert_eq!(refusal.retry_in, Duration::from_secs(60), "max_pause");
    // A pause that outlasts the delivery's deadline is never waited.
    let soon = Instant::now() + Duration::from_millis(10);
    tokio::time::advance(Duration::from_millis(59_950)).await;
    assert_eq!(gate.admit(soon).await.err().unwrap().reason, "paused");
}

#[tokio::test(start_paused = true)]
async fn the_breaker_opens_refuses_without_a_call_and_a_probe_closes_it() {
    let gate = Gate::new("p", settings());
    // A 4xx answer is no failure; transport errors and 5xx are.
    gate.admit(far()).await.unwrap().record(&status(422, None));
    for result in [transport(), status(503, None), transport()] {
        gate.admit(far()).await.unwrap().record(&result);
    }
    let refusal = gate.admit(far()).await.err().expect("open");
    assert_eq!(refusal.reason, "breaker_open");
    assert_eq!(refusal.retry_in, Duration::from_secs(10));
    tokio::time::advance(Duration::from_secs(10)).await;
    let probe = gate.admit(far()).await.expect("the probe");
    let other = gate.admit(far()).await.err().expect("one probe at a time");
    assert_eq!(other.reason, "breaker_open");
    // An abandoned probe lets the next call probe.
    drop(probe);
    let probe = gate.admit(far()).await.expect("a new probe");
    probe.record(&ok());
    assert!(gate.admit(far()).await.is_ok(), "closed");
    let status = gate.status(Instant::now(), time::OffsetDateTime::now_utc());
    assert_eq!(status["breaker"]["state"], "closed");
}

/// Calls that passed the breaker and then waited for a place do not go
/// out once it opened meanwhile.
#[tokio::test(start_paused = true)]
async fn calls_waiting_for_a_place_meet_a_breaker_opened_meanwhile() {
    let gate = Arc::new(Gate::new(
        "p",
        GateSettings {
            concurrency: AimdSettings {
                initial: 1,
                ..settings().concurrency
            },
            ..settings()
        },
    ));
    let mut held = gate.admit(far()).await.unwrap();
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let gate = gate.clone();
            tokio::spawn(async move { gate.admit(far()).await.map(|p| p.record(&transport())) })
        })
        .collect();
    tokio::task::yield_now().await;
    for _ in 0..2 {
        held.record(&transport());
        held = gate.admit(far()).await.unwrap();
    }
    // The third failure opens it while the three still wait.
    held.record(&transport());
    for waiter in waiters {
        let refusal = waiter.await.unwrap().expect_err("refused, not sent");
        assert_eq!(refusal.reason, "breaker_open");
    }
}

#[tokio::test(start_paused = true)]
async fn a_full_concurrency_limit_refuses_after_the_short_wait_and_frees_on_answer() {
    let gate = Arc::new(Gate::new("p", settings()));
    let a = gate.admit(far()).await.unwrap();
    let _b = gate.admit(far()).await.unwrap();
    let started = Instant::now();
    let refusal = gate.admit(far()).await.err().expect("limit 2 reached");
    assert_eq!(refusal.reason, "concurrency");
    assert_eq!(Instant::now() - started, Duration::from_millis(100));
    // A waiter gets the place of a call that answers meanwhile.
    let waiter = tokio::spawn({
        let gate = gate.clone();
        async move { gate.admit(far()).await.map(|p| p.record(&ok())) }
    });
    tokio::time::advance(Duration::from_millis(30)).await;
    a.record(&ok());
    waiter.await.unwrap().expect("admitted once a place freed");
}

#[tokio::test(start_paused = true)]
async fn the_rate_limit_waits_within_its_bound_and_refuses_beyond_it() {
    let gate = Gate::new(
        "p",
        GateSettings {
            rate_limit: vec![Window {
                limit: 2,
                window: Duration::from_secs(1),
            }],
            limiter_max_wait: Duration::from_millis(1500),
            concurrency: AimdSettings {
                initial: 8,
                ..settings().concurrency
            },
            ..settings()
        },
    );
    let t0 = Instant::now();
    for _ in 0..2 {
        gate.admit(far()).await.unwrap().record(&ok());
    }
    // The third waits one window after the first answer.
    let third = gate.admit(far()).await.unwrap();
    assert_eq!(Instant::now() - t0, Duration::from_secs(1));
    // The second call's slot frees at the same moment.
    let fourth = gate.admit(far()).await.unwrap();
    assert_eq!(Instant::now() - t0, Duration::from_secs(1));
    // Both in flight hold every slot: one frees a window after an answer,
    // beyond what the delivery's deadline leaves.
    let soon = Instant::now() + Duration::from_millis(500);
    let refusal = gate
        .admit(soon)
        .await
        .err()
        .expect("no slot before the deadline");
    assert_eq!(refusal.reason, "rate_limit");
    assert_eq!(refusal.retry_in, Duration::from_secs(1));
    third.record(&ok());
    // Now its slot frees at 2 s: a caller may wait for it.
    let fifth = gate.admit(far()).await.unwrap();
    assert_eq!(Instant::now() - t0, Duration::from_secs(2));
    let status = gate.status(Instant::now(), time::OffsetDateTime::now_utc());
    assert_eq!(status["rate_limit"][0]["used"], 2, "{status}");
    assert_eq!(status["rate_limit"][0]["window_ms"], 1000, "{status}");
    assert_eq!(status["concurrency"]["in_flight"], 2, "{status}");
    drop((fourth, fifth));
}

#[tokio::test(start_paused = true)]
async fn refusals_hold_nothing_and_unsent_calls_teach_nothing() {
    let gate = Gate::new(
        "p",
        GateSettings {
            rate_limit: vec![Window {
                limit: 1,
                window: Duration::from_secs(1),
            }],
            ..settings()
        },
    );
    // A call the client refused to send (Unavailable) neither opens the
    // breaker nor pauses, and its rate-limit slot still counts: it was let go.
    for _ in 0..5 {
        let permit = gate.admit(far()).await.unwrap();
        permit.record(&Err::<(), _>(CallError::new(
            ErrorClass::Unavailable,
            "no grant",
        )));
    }
    let mut state = gate.lock();
    assert_eq!(state.breaker.state(), State::Closed);
    assert_eq!(state.aimd.in_flight(), 0);
    assert!(state.pause_until.is_none());
    assert_eq!(state.limiter.usage(Instant::now())[0].1, 1);
}
