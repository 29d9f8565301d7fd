//! The data path's threads: `proxy.workers` single-threaded runtimes. Each accepts on its own
//! listener of every proxy address (SO_REUSEPORT: the kernel spreads new connections among
//! them by their addresses) and runs the connections it accepted to their end, so a
//! connection's wakeups never cross threads and no worker steals another's tasks. The rest of
//! the appliance (admin server, DNS, health checks, the Elastic IP) runs on the main runtime.
//!
//! Measured on the benchmark's two cores (a new TLS connection and one request, 1,000 a
//! second, CPU time of the proxy per connection): tokio's work-stealing runtime with two
//! threads 370 µs; two workers 375 µs; one worker 312 µs, with 3.3 context switches per
//! connection against 5.2 for two workers. Most of a TCP proxy's CPU time is the kernel's
//! (80% in a profile), and a thread that wakes for fewer events each time pays more of it in
//! wakeups. Hence the default: one worker per two CPUs, the rest left to the kernel's network
//! processing (softirqs, which on a real NIC run on the CPUs its interrupts go to).

use std::future::Future;
use std::io;
use std::num::NonZeroUsize;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The running workers. Dropped, each stops and drops the tasks it still holds, and the drop
/// waits (up to [`JOIN_LIMIT`]) for their threads to end: a task dropped there logs its
/// access-log line, which must be in the log's buffer before the exit writes the buffer out.
pub struct Workers {
    handles: Vec<Handle>,
    threads: Vec<std::thread::JoinHandle<()>>,
    stop: CancellationToken,
}

/// How long dropping [`Workers`] waits for their threads to drop their tasks and end.
const JOIN_LIMIT: Duration = Duration::from_secs(2);

impl Workers {
    /// Starts `count` workers; 0 means [`default_count`]. Each builds its runtime on its own
    /// thread, so a failure here leaves no runtime to drop inside the caller's.
    pub fn start(count: usize) -> io::Result<Workers> {
        let stop = CancellationToken::new();
        let mut workers = Workers { handles: Vec::new(), threads: Vec::new(), stop: stop.clone() };
        for i in 0..resolve(count) {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let until = stop.clone();
            let thread = std::thread::Builder::new().name(format!("worker-{i}")).spawn(move || {
                match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => {
                        let _ = tx.send(Ok(runtime.handle().clone()));
                        // A worker runs its tasks only inside block_on: until the workers are dropped.
                        runtime.block_on(until.cancelled());
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })?;
            workers.threads.push(thread);
            // `?` drops `workers`, which stops those already started.
            let handle =
                rx.recv().map_err(|_| io::Error::other("a worker thread ended before its runtime started"))??;
            workers.handles.push(handle);
        }
        Ok(workers)
    }

    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// Runs `task` on worker `i` (modulo their count); what it spawns stays on that worker.
    pub fn spawn<F>(&self, i: usize, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handles[i % self.handles.len()].spawn(task)
    }

    /// What the systemd watchdog asks before it is fed: a worker whose thread is stuck would
    /// otherwise go unnoticed, the watchdog's task running on the main runtime.
    pub fn heartbeat(&self) -> Heartbeat {
        Heartbeat { handles: self.handles.clone() }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
        // Bounded: a thread stuck in a task's drop must not hold the exit.
        let deadline = std::time::Instant::now() + JOIN_LIMIT;
        while self.threads.iter().any(|t| !t.is_finished()) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        for thread in std::mem::take(&mut self.threads) {
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

/// Asks every worker to run a task at once.
#[derive(Clone)]
pub struct Heartbeat {
    handles: Vec<Handle>,
}

impl Heartbeat {
    /// True when every worker ran a task within `limit`.
    pub async fn all_answer(&self, limit: Duration) -> bool {
        let answers = self.handles.iter().map(|h| h.spawn(async {})).collect::<Vec<_>>();
        tokio::time::timeout(limit, async {
            for answer in answers {
                if answer.await.is_err() {
                    return false;
                }
            }
            true
        })
        .await
        .unwrap_or(false)
    }
}

/// The worker count `proxy.workers` asks for: itself, or [`default_count`] for 0.
pub fn resolve(count: usize) -> usize {
    if count == 0 { default_count() } else { count }
}

/// [`descriptors`] of the workers `config` asks for.
pub fn descriptors_for(config: &crate::config::ProxyConfig) -> u64 {
    descriptors(resolve(config.workers), config.listen.len())
}

/// Descriptors the workers hold besides connections: each runtime's epoll, its wakeup
/// eventfd and signal-driver socket, and one listener per proxy address.
pub fn descriptors(count: usize, listen_addresses: usize) -> u64 {
    (count * (3 + listen_addresses)) as u64
}

/// One per two CPUs the process may run on (its affinity mask and cgroup quota), at least one.
pub fn default_count() -> usize {
    (std::thread::available_parallelism().map_or(1, NonZeroUsize::get) / 2).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tasks_stay_on_their_worker_and_stop_with_the_workers() {
        let workers = Workers::start(2).unwrap();
        assert_eq!(workers.count(), 2);
        let names = |i| {
            workers.spawn(i, async {
                // Spawned from a worker: runs on the same thread.
                let outer = std::thread::current().name().map(str::to_owned);
                let inner = tokio::spawn(async { std::thread::current().name().map(str::to_owned) }).await.unwrap();
                (outer, inner)
            })
        };
        assert_eq!(names(0).await.unwrap(), (Some("worker-0".into()), Some("worker-0".into())));
        assert_eq!(names(3).await.unwrap(), (Some("worker-1".into()), Some("worker-1".into())));
        assert!(workers.heartbeat().all_answer(Duration::from_secs(5)).await);
        let stuck = workers.spawn(1, async { std::thread::sleep(Duration::from_millis(600)) });
        assert!(!workers.heartbeat().all_answer(Duration::from_millis(200)).await, "a stuck worker does not answer");
        stuck.await.unwrap();
        let pending = workers.spawn(0, std::future::pending::<()>());
        drop(workers);
        assert!(pending.await.unwrap_err().is_cancelled(), "a stopped worker drops its tasks");
    }

    #[test]
    fn dropping_the_workers_returns_once_their_tasks_are_dropped() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        /// Set as it is dropped, a little after the drop began.
        struct Flag(Arc<AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                std::thread::sleep(Duration::from_millis(50));
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let workers = Workers::start(2).unwrap();
        let dropped = Arc::new(AtomicBool::new(false));
        let flag = Flag(Arc::clone(&dropped));
        let (running, started) = std::sync::mpsc::channel();
        let _task = workers.spawn(1, async move {
            let _flag = flag;
            running.send(()).unwrap();
            std::future::pending::<()>().await
        });
        started.recv().unwrap();
        drop(workers);
        assert!(dropped.load(Ordering::SeqCst), "the task was still being dropped after the workers were");
    }
}
