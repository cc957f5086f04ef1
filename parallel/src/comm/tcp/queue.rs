//! Started work of the tcp backend: the `*_start` calls put their operation in the
//! communicator's FIFO and return; a thread that belongs to the communicator (made by the
//! first start, ended when the communicator is dropped) runs the operations one after the
//! other, through exactly the code of the blocking calls. So started operations run in
//! start order, every rank's thread issues them in the same order, and timeouts, `abort()`,
//! peer loss and the "broken after a failure" rule apply to them as to blocking calls (the
//! timeout counts from when the operation begins to run). Blocking calls first wait until
//! every operation started before them has finished ([`Queue::drain`]), so they too come
//! after.

use std::collections::VecDeque;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::super::{CommError, Work};
use super::{lock, Control, Group};

/// An operation to run on the communicator's thread.
pub(super) type Job = Box<dyn FnOnce(&Group) -> Result<(), CommError> + Send>;

/// Where a started operation's outcome lands.
#[derive(Debug, Default)]
struct Slot {
    result: Mutex<Option<Result<(), CommError>>>,
    filled: Condvar,
}

impl Slot {
    fn fill(&self, r: Result<(), CommError>) {
        let mut g = lock(&self.result);
        if g.is_none() {
            *g = Some(r);
        }
        drop(g);
        self.filled.notify_all();
    }
}

/// Fills its slot when dropped unfilled (a job that never ran: a panic, or a thread that
/// could not run it), so that no `wait` is left without an answer.
struct Completion(Option<Arc<Slot>>);

impl Completion {
    fn complete(mut self, r: Result<(), CommError>) {
        if let Some(slot) = self.0.take() {
            slot.fill(r);
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let Some(slot) = self.0.take() {
            slot.fill(Err(CommError::Broken {
                cause: "the communicator's thread ended before the started operation ran".into(),
            }));
        }
    }
}

struct Entry {
    job: Job,
    done: Completion,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Entry>,
    /// Operations started so far.
    issued: u64,
    /// Operations finished (in order) so far.
    finished: u64,
    /// No more operations: the thread ends once the FIFO is empty.
    closed: bool,
}

/// One communicator's FIFO of started operations and its thread.
#[derive(Default)]
pub(super) struct Queue {
    state: Mutex<State>,
    /// The thread waits here for work.
    more: Condvar,
    /// `drain` waits here for `finished` to advance.
    progressed: Condvar,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for Queue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = lock(&self.state);
        f.debug_struct("Queue")
            .field("queued", &s.jobs.len())
            .field("issued", &s.issued)
            .field("finished", &s.finished)
            .finish()
    }
}

/// How long one wait slice lasts before `drain` looks at the abort flag again.
const SLICE: Duration = Duration::from_millis(50);

impl Queue {
    /// Queues `job` (named `op`) to run on the thread of `group`'s communicator, starting
    /// that thread if needed.
    pub(super) fn push(
        self: &Arc<Queue>,
        group: &Arc<Group>,
        op: &'static str,
        job: Job,
    ) -> Result<Box<dyn Work>, CommError> {
        self.ensure_thread(group)?;
        let slot = Arc::new(Slot::default());
        let mut s = lock(&self.state);
        if s.closed {
            return Err(CommError::Broken {
                cause: "the communicator is being shut down".into(),
            });
        }
        s.jobs.push_back(Entry {
            job,
            done: Completion(Some(slot.clone())),
        });
        s.issued += 1;
        drop(s);
        self.more.notify_one();
        Ok(Box::new(TcpWork { op, slot }))
    }

    fn ensure_thread(self: &Arc<Queue>, group: &Arc<Group>) -> Result<(), CommError> {
        let mut t = lock(&self.thread);
        if t.is_none() {
            let (queue, group) = (self.clone(), group.clone());
            let handle = std::thread::Builder::new()
                .name(format!("weaver-comm-{}", group.path))
                .spawn(move || queue.serve(&group))
                .map_err(|e| CommError::Io {
                    op: "starting the communicator's thread",
                    source: e,
                })?;
            *t = Some(handle);
        }
        Ok(())
    }

    /// The thread: runs operations in order until closed and empty.
    fn serve(&self, group: &Group) {
        loop {
            let entry = {
                let mut s = lock(&self.state);
                loop {
                    if let Some(e) = s.jobs.pop_front() {
                        break e;
                    }
                    if s.closed {
                        return;
                    }
                    s = self.more.wait(s).unwrap_or_else(|e| e.into_inner());
                }
            };
            let Entry { job, done } = entry;
            let result = match catch_unwind(AssertUnwindSafe(|| job(group))) {
                Ok(r) => r,
                Err(_) => {
                    // A bug in the collectives: this rank's stream state is unknown.
                    let e = CommError::Broken {
                        cause: "a started operation panicked (internal error)".into(),
                    };
                    group.ctl.poison(&e);
                    Err(e)
                }
            };
            // Answer first: once a blocking call issued after it runs, `is_done` says true.
            done.complete(result);
            lock(&self.state).finished += 1;
            self.progressed.notify_all();
        }
    }

    /// Waits until every operation started so far has finished (what a blocking call does
    /// first). Each of them ends within its own timeout, and all of them promptly after
    /// `abort()`; an abort also ends this wait at once.
    pub(super) fn drain(&self, ctl: &Control) -> Result<(), CommError> {
        let mut s = lock(&self.state);
        let target = s.issued;
        while s.finished < target {
            if ctl.aborted.load(Ordering::SeqCst) {
                return Err(CommError::Aborted);
            }
            s = self
                .progressed
                .wait_timeout(s, SLICE)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Lets the thread finish what is queued, then ends it (the communicator is dropped or
    /// reconfigured). Bounded like [`Queue::drain`].
    pub(super) fn close(&self) {
        lock(&self.state).closed = true;
        self.more.notify_all();
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
        // A reconfigured communicator may start work again.
        lock(&self.state).closed = false;
    }
}

/// A started operation of the tcp backend.
struct TcpWork {
    op: &'static str,
    slot: Arc<Slot>,
}

impl fmt::Debug for TcpWork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpWork")
            .field("op", &self.op)
            .field("done", &self.is_done())
            .finish()
    }
}

impl Work for TcpWork {
    fn wait(self: Box<Self>) -> Result<(), CommError> {
        // No deadline of its own: the operation ends within its timeout (or promptly after
        // an abort), and returning earlier would hand the caller tensors that the
        // communicator's thread may still write.
        let mut r = lock(&self.slot.result);
        loop {
            if let Some(res) = r.take() {
                return res;
            }
            r = self.slot.filled.wait(r).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn is_done(&self) -> bool {
        lock(&self.slot.result).is_some()
    }
}
