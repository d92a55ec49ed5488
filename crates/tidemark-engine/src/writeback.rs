//! Background writeback of journals that hosts do not flush.
//!
//! A host that writes without flushing leaves its records in the page cache as dirty pages.
//! Left to the kernel, they pile up to `vm.dirty_background_ratio` of memory, and then every
//! append waits in the kernel's dirty-page throttling, under the group's lock; sealed segments
//! also stay cached (only a sync lets them go, see `SyncTicket::sync`), so each append touches
//! fresh memory. Instead, every [`WRITEBACK_BYTES`] of appends a group asks this thread to flush
//! it: the fdatasync runs outside the group's lock while writes go on, dirty pages stay bounded,
//! and synced segments leave the page cache. Durability promises do not change: a write is
//! durable once a flush covers it, whoever asked for that flush.

use std::sync::{Arc, Weak};

use parking_lot::{Condvar, Mutex};

use crate::group::Group;

/// Appended bytes after which a group asks for a writeback (a quarter of a journal segment).
pub const WRITEBACK_BYTES: u64 = 16 << 20;

/// Groups waiting for a writeback, and the thread that does them.
#[derive(Default)]
pub struct Writeback {
    queue: Mutex<Queue>,
    wake: Condvar,
}

#[derive(Default)]
struct Queue {
    due: Vec<Weak<Group>>,
    stopped: bool,
}

impl Writeback {
    /// Ask for `group` to be flushed soon. Cheap and non-blocking: called under the group's lock.
    pub fn request(&self, group: &Weak<Group>) {
        let mut queue = self.queue.lock();
        if !queue.due.iter().any(|g| g.ptr_eq(group)) {
            queue.due.push(group.clone());
            self.wake.notify_one();
        }
    }

    /// Serve requests until [`Writeback::stop`]. A failed flush poisons its group (and says so);
    /// here it is only logged.
    pub fn run(&self) {
        loop {
            let due = {
                let mut queue = self.queue.lock();
                while queue.due.is_empty() && !queue.stopped {
                    self.wake.wait(&mut queue);
                }
                if queue.stopped {
                    return;
                }
                std::mem::take(&mut queue.due)
            };
            for group in due.iter().filter_map(Weak::upgrade) {
                if let Err(e) = group.flush() {
                    tracing::warn!(group = %group.name, error = %e, "background writeback failed");
                }
            }
        }
    }

    /// Make [`Writeback::run`] return (requests still queued are dropped: the shutdown flushes
    /// every group anyway).
    pub fn stop(&self) {
        self.queue.lock().stopped = true;
        self.wake.notify_all();
    }
}

/// Start the writeback thread.
pub fn start() -> (Arc<Writeback>, std::thread::JoinHandle<()>) {
    let writeback = Arc::new(Writeback::default());
    let serving = writeback.clone();
    let handle = std::thread::Builder::new()
        .name("tidemark-writeback".into())
        .spawn(move || serving.run())
        .expect("spawn the writeback thread");
    (writeback, handle)
}
