//! Ed25519 signatures verified together (issue 14 item 7).
//!
//! Each delivery is handled by a task of its own, so under load many
//! decisions reach their signature check at the same moment. One
//! `verify_batch` over `n` signatures costs about half of `n` single
//! verifications from `n = 8` on (a seventh less at 2; figures in the
//! README, Performance), so the delivery tasks pool their signatures.
//!
//! A batch is whatever is queued once the tasks that are ready now have
//! run (one scheduler round: `yield_now`), never a timer: alone, a
//! signature is checked at once, the single way, and latency does not grow
//! under low load.
//!
//! A batch passes or fails whole. When it fails, each signature in it is
//! checked alone, so a forged one is refused exactly as a single
//! verification refuses it, and only that one. The two checks can disagree
//! only on a signature its key holder built on purpose, with a small-order
//! component or a non-canonical encoding of `R` (no signing library makes
//! one): the single check refuses it, a batch may pass it. Nobody without
//! the private key can build one, so that lets in no one who could not
//! sign anyway.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use tokio::sync::oneshot;

/// The most signatures in one batch. A delivery task checks a batch on a
/// runtime thread, as it checked its own signature alone before; 32 keep
/// that near half a millisecond, and larger batches save little more per
/// signature (measured: 16 to 17 µs each from 16 to 64 here).
pub const MAX_BATCH: usize = 32;

/// One signature waiting for its answer.
struct Job {
    ticket: u64,
    message: Arc<Vec<u8>>,
    signature: Signature,
    key: VerifyingKey,
    answer: oneshot::Sender<bool>,
}

/// The signatures waiting for a batch, shared by the delivery tasks.
///
/// There is no batching task: a task queues its signature, lets the other
/// tasks that are ready now run (one scheduler round), then takes whatever
/// is queued, its own signature and the others', verifies it all and
/// answers each. A task that finds its signature taken waits for the
/// answer of the task that took it. Verification stays on the delivery
/// tasks, spread over the runtime's threads as before.
#[derive(Default)]
pub struct Batcher {
    queue: Mutex<Queue>,
    /// The largest batch this batcher formed, for its own tests (the
    /// global counters below are shared by every test running at once).
    #[cfg(test)]
    largest: std::sync::atomic::AtomicUsize,
}

/// Jobs in the order they were queued, each with its ticket.
#[derive(Default)]
struct Queue {
    next: u64,
    jobs: VecDeque<Job>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").finish_non_exhaustive()
    }
}

impl Batcher {
    /// Whether `signature` over `message` was made with `key`, as
    /// `VerifyingKey::verify` (RFC 8032) judges it.
    pub async fn verify(&self, message: Vec<u8>, signature: Signature, key: VerifyingKey) -> bool {
        let message = Arc::new(message);
        let (answer, answered) = oneshot::channel();
        let ticket = {
            let mut queue = self.lock();
            let ticket = queue.next;
            queue.next += 1;
            queue.jobs.push_back(Job {
                ticket,
                message: message.clone(),
                signature,
                key,
                answer,
            });
            ticket
        };
        tokio::task::yield_now().await;
        // Batches are taken from the front until this task's own signature
        // is taken, by this task or another: never more, so no task keeps
        // verifying for others under a steady load.
        loop {
            let batch: Vec<Job> = {
                let mut queue = self.lock();
                if queue.jobs.front().is_none_or(|j| j.ticket > ticket) {
                    break;
                }
                let take = queue.jobs.len().min(MAX_BATCH);
                queue.jobs.drain(..take).collect()
            };
            #[cfg(test)]
            {
                stats::record(batch.len());
                let largest = &self.largest;
                largest.fetch_max(batch.len(), std::sync::atomic::Ordering::Relaxed);
            }
            let verdicts = check(&batch);
            for (job, valid) in batch.into_iter().zip(verdicts) {
                // A delivery task that was cancelled no longer waits.
                let _ = job.answer.send(valid);
            }
        }
        match answered.await {
            Ok(valid) => valid,
            // The task that took it panicked: checked here, alone, so an
            // answer is never lost.
            Err(_) => single(&key, &message, &signature),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn check(batch: &[Job]) -> Vec<bool> {
    let messages: Vec<&[u8]> = batch.iter().map(|j| j.message.as_slice()).collect();
    let signatures: Vec<Signature> = batch.iter().map(|j| j.signature).collect();
    let keys: Vec<VerifyingKey> = batch.iter().map(|j| j.key).collect();
    verify_all(&messages, &signatures, &keys)
}

/// Each signature's verdict, as a single verification gives it. The three
/// slices are the same length.
fn verify_all(messages: &[&[u8]], signatures: &[Signature], keys: &[VerifyingKey]) -> Vec<bool> {
    // Alone, a batch costs more than a single check (its transcript and
    // the decompression of `R`).
    if messages.len() > 1 && ed25519_dalek::verify_batch(messages, signatures, keys).is_ok() {
        return vec![true; messages.len()];
    }
    messages
        .iter()
        .zip(signatures)
        .zip(keys)
        .map(|((message, signature), key)| single(key, message, signature))
        .collect()
}

fn single(key: &VerifyingKey, message: &[u8], signature: &Signature) -> bool {
    key.verify(message, signature).is_ok()
}

/// What the tests and the micro benchmark read of the batches formed.
#[cfg(test)]
mod stats {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    static BATCHES: AtomicUsize = AtomicUsize::new(0);
    static SIGNATURES: AtomicUsize = AtomicUsize::new(0);

    pub(super) fn record(len: usize) {
        BATCHES.fetch_add(1, Relaxed);
        SIGNATURES.fetch_add(len, Relaxed);
    }

    /// Batches and signatures so far.
    pub(super) fn totals() -> (usize, usize) {
        (BATCHES.load(Relaxed), SIGNATURES.load(Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use ed25519_dalek::{Signer, SigningKey};
    use rand::Rng;

    use super::*;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    /// A decision's signed bytes, `{id}.{timestamp}.{body}`, about the
    /// size the bench publishes.
    fn message(i: usize) -> Vec<u8> {
        format!(
            "msg_{i}.1700000000.{{\"decision_id\":\"d-{i}\",\"provider\":\"qonto\",\"action\":\"approve\",\"target\":{{\"request_id\":\"{i:032}\"}},\"reviewer\":\"{}\"}}",
            "r".repeat(200)
        )
        .into_bytes()
    }

    struct Case {
        message: Vec<u8>,
        signature: Signature,
        key: VerifyingKey,
        valid: bool,
    }

    /// The `i`th signature by `signer`, forged (by another key, or over
    /// other bytes) when `forged`.
    fn case(i: usize, signer: &SigningKey, forged: bool) -> Case {
        let message = message(i);
        let signature = match (forged, i % 2) {
            (false, _) => signer.sign(&message),
            (true, 0) => key(0xee).sign(&message),
            (true, _) => signer.sign(&message[1..]),
        };
        Case {
            message,
            signature,
            key: signer.verifying_key(),
            valid: !forged,
        }
    }

    fn verdicts(cases: &[Case]) -> Vec<bool> {
        let messages: Vec<&[u8]> = cases.iter().map(|c| c.message.as_slice()).collect();
        let signatures: Vec<Signature> = cases.iter().map(|c| c.signature).collect();
        let keys: Vec<VerifyingKey> = cases.iter().map(|c| c.key).collect();
        verify_all(&messages, &signatures, &keys)
    }

    #[test]
    fn a_batch_of_valid_signatures_passes() {
        let signer = key(1);
        let cases: Vec<Case> = (0..MAX_BATCH).map(|i| case(i, &signer, false)).collect();
        assert_eq!(verdicts(&cases), vec![true; MAX_BATCH]);
        assert_eq!(verdicts(&cases[..1]), vec![true]);
    }

    #[test]
    fn one_forged_signature_is_refused_and_only_that_one() {
        let signer = key(1);
        for forged_at in [0, 1, 17, 63] {
            let cases: Vec<Case> = (0..64).map(|i| case(i, &signer, i == forged_at)).collect();
            let expected: Vec<bool> = (0..64).map(|i| i != forged_at).collect();
            assert_eq!(verdicts(&cases), expected, "forged at {forged_at}");
        }
        // A lone forged signature takes the single path.
        assert_eq!(verdicts(&[case(4, &signer, true)]), vec![false]);
        // A valid signature presented with another key than its signer's.
        let mut swapped: Vec<Case> = (0..8).map(|i| case(i, &signer, false)).collect();
        swapped[3].key = key(2).verifying_key();
        let expected: Vec<bool> = (0..8).map(|i| i != 3).collect();
        assert_eq!(verdicts(&swapped), expected);
    }

    #[test]
    fn a_batch_mixes_keys() {
        let signers: Vec<SigningKey> = (1..=5).map(key).collect();
        let mut cases: Vec<Case> = (0..40)
            .map(|i| case(i, &signers[i % signers.len()], false))
            .collect();
        assert_eq!(verdicts(&cases), vec![true; 40]);
        // Right signer, wrong message (one byte changed): refused.
        cases[7].message[20] ^= 1;
        cases[22] = case(22, &signers[2], true);
        let expected: Vec<bool> = (0..40).map(|i| i != 7 && i != 22).collect();
        assert_eq!(verdicts(&cases), expected);
    }

    #[test]
    fn a_signature_with_a_non_canonical_s_is_refused_in_a_batch() {
        let signer = key(1);
        let mut cases: Vec<Case> = (0..4).map(|i| case(i, &signer, false)).collect();
        // s + l: the same scalar, not its canonical encoding (RFC 8032
        // refuses it, so does the single check).
        let mut bytes = cases[2].signature.to_bytes();
        let l: [u8; 32] = [
            0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9,
            0xde, 0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
        ];
        let mut carry = 0u16;
        for (s, l) in bytes[32..].iter_mut().zip(l) {
            let sum = u16::from(*s) + u16::from(l) + carry;
            *s = sum as u8;
            carry = sum >> 8;
        }
        cases[2].signature = Signature::from_bytes(&bytes);
        assert_eq!(verdicts(&cases), vec![true, true, false, true]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_submitters_each_get_their_own_verdict() {
        let signers: Arc<Vec<SigningKey>> = Arc::new((1..=3).map(key).collect());
        let batcher = Arc::new(Batcher::default());
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..64usize {
            let (batcher, signers) = (batcher.clone(), signers.clone());
            tasks.spawn(async move {
                let mut checked = 0;
                for n in 0..8 {
                    let i = t * 8 + n;
                    let forged = rand::thread_rng().gen_bool(0.2);
                    let c = case(i, &signers[i % signers.len()], forged);
                    let got = batcher.verify(c.message, c.signature, c.key).await;
                    assert_eq!(got, c.valid, "signature {i}, forged {forged}");
                    checked += 1;
                    if rand::thread_rng().gen_bool(0.3) {
                        tokio::task::yield_now().await;
                    }
                }
                checked
            });
        }
        let deadline = Duration::from_secs(120);
        let mut total = 0;
        tokio::time::timeout(deadline, async {
            while let Some(done) = tasks.join_next().await {
                total += done.expect("a submitter panicked");
            }
        })
        .await
        .expect("the batcher did not answer every submitter in time");
        assert_eq!(total, 64 * 8);
        assert!(
            batcher.largest.load(std::sync::atomic::Ordering::Relaxed) > 1,
            "no batch of more than one signature was formed"
        );
    }

    #[test]
    fn a_cancelled_submitter_leaves_the_others_their_answers() {
        let batcher = Batcher::default();
        let signer = key(1);
        let verify = |c: Case| batcher.verify(c.message, c.signature, c.key);
        // Queued, then dropped before its batch is taken (a delivery task
        // cancelled when the broker session is lost).
        let mut cancelled = Box::pin(verify(case(0, &signer, false)));
        assert_eq!(futures_util::FutureExt::now_or_never(&mut cancelled), None);
        drop(cancelled);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let verdicts = rt.block_on(futures_util::future::join_all([
            verify(case(1, &signer, false)),
            verify(case(2, &signer, true)),
            verify(case(3, &signer, false)),
        ]));
        assert_eq!(verdicts, [true, false, true]);
        assert!(batcher.lock().jobs.is_empty(), "a job was left queued");
    }

    /// CPU time of this process so far (all threads).
    fn cpu_time() -> Duration {
        // SAFETY: getrusage(2) only writes the struct it is given, which
        // is plain integers and lives across the call.
        let usage = unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_SELF, &mut usage);
            usage
        };
        let t = |tv: libc::timeval| {
            Duration::from_secs(tv.tv_sec.unsigned_abs())
                + Duration::from_micros(tv.tv_usec.unsigned_abs())
        };
        t(usage.ru_utime) + t(usage.ru_stime)
    }

    fn micros_per(cpu: Duration, n: usize) -> f64 {
        cpu.as_secs_f64() * 1e6 / n as f64
    }

    /// `k` tasks on a two-thread runtime (the worker's on two cores)
    /// verify `cases` between them, each its share in turn; CPU µs per
    /// signature of the whole process.
    fn concurrent(cases: &Arc<Vec<Case>>, k: usize, batched: bool) -> (f64, f64) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let batcher = Arc::new(Batcher::default());
        let start = cpu_time();
        let began = std::time::Instant::now();
        rt.block_on(async {
            let mut tasks = tokio::task::JoinSet::new();
            for t in 0..k {
                let (cases, batcher) = (cases.clone(), batcher.clone());
                tasks.spawn(async move {
                    for c in cases.iter().skip(t).step_by(k) {
                        // The worker builds the signed bytes either way.
                        let message = c.message.clone();
                        let valid = if batched {
                            batcher.verify(message, c.signature, c.key).await
                        } else {
                            single(&c.key, &message, &c.signature)
                        };
                        assert!(valid);
                    }
                });
            }
            while let Some(done) = tasks.join_next().await {
                done.unwrap();
            }
        });
        let wall = began.elapsed();
        let cpu = cpu_time() - start;
        drop(rt);
        (micros_per(cpu, cases.len()), micros_per(wall, cases.len()))
    }

    /// The figures of the README (Performance): `cargo test --release --lib
    /// authn::batch::tests::cpu_per_signature -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, run in release mode"]
    fn cpu_per_signature() {
        const N: usize = 10_000;
        let signer = key(1);
        let cases: Arc<Vec<Case>> = Arc::new((0..N).map(|i| case(i, &signer, false)).collect());
        let start = cpu_time();
        for c in cases.iter() {
            assert!(single(&c.key, &c.message, &c.signature));
        }
        let alone = micros_per(cpu_time() - start, N);
        println!("single verify, tight loop: {alone:.1} us/signature");
        for n in [2, 4, 8, 16, 32, 64] {
            let start = cpu_time();
            for chunk in cases.chunks(n) {
                assert!(verdicts(chunk).iter().all(|v| *v));
            }
            let per = micros_per(cpu_time() - start, N);
            println!("verify_batch of {n}: {per:.1} us/signature");
        }
        for k in [1, 8, 64, 256] {
            let (singly, singly_wall) = concurrent(&cases, k, false);
            let (batches, signatures) = stats::totals();
            let (batched, batched_wall) = concurrent(&cases, k, true);
            let (b, s) = stats::totals();
            let mean = (s - signatures) as f64 / (b - batches).max(1) as f64;
            println!(
                "k = {k:3}: CPU single {singly:.1} us, batcher {batched:.1} us/signature ({:.0} %), mean batch {mean:.1}; wall {singly_wall:.1} and {batched_wall:.1} us/signature",
                batched / singly * 100.0
            );
        }
    }
}
