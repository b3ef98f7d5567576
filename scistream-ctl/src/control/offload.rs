//! A few long-lived threads for the data plane's blocking calls (a backend's
//! start, a retarget that waits for a program to reload): they never run on a
//! runtime worker, where a 5 s wait would stall every stream on 2 cores.
//! Not tokio's blocking pool: its idle threads exit, and a program forked
//! from one would die with it (PR_SET_PDEATHSIG follows the forking thread).

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use tokio::runtime::Handle;
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

pub struct Offload {
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl Offload {
    /// `threads` workers that run jobs inside `rt` (so a job may spawn tasks
    /// and register sockets). They end when this is dropped.
    pub fn new(threads: usize, rt: Handle) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let (rx, rt) = (rx.clone(), rt.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("s2cs-dataplane-{i}"))
                .spawn(move || {
                    let _rt = rt.enter();
                    loop {
                        let job = crate::lock(&rx).recv();
                        match job {
                            // A panicking job loses only its answer (the caller
                            // sees an error), not this thread.
                            Ok(job) => {
                                drop(std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)))
                            }
                            Err(_) => return,
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a data-plane thread");
            }
        }
        Self {
            jobs: Mutex::new(tx),
        }
    }

    /// Runs `f` on one of the threads; `None` if it panicked (or no thread runs).
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        crate::lock(&self.jobs).send(job).ok()?;
        rx.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[tokio::test(flavor = "current_thread")]
    async fn a_blocking_job_leaves_the_runtime_free_and_a_panic_is_an_answer() {
        let off = Offload::new(2, Handle::current());
        let ticks = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let t = ticks.clone();
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                t.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        let start = Instant::now();
        let v = off
            .run(|| {
                std::thread::sleep(Duration::from_millis(300));
                7
            })
            .await;
        assert_eq!(v, Some(7));
        assert!(start.elapsed() >= Duration::from_millis(300));
        // The single runtime thread kept ticking while the job slept.
        assert!(ticks.load(std::sync::atomic::Ordering::Relaxed) >= 10);
        assert_eq!(off.run(|| -> u8 { panic!("job fails") }).await, None);
        assert_eq!(
            off.run(|| 8).await,
            Some(8),
            "the thread survived the panic"
        );
        ticker.abort();
    }
}
