//! Admission: a fair (FIFO) semaphore of generation slots plus a bounded queue.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::ApiError;

pub struct Scheduler {
    slots: Arc<Semaphore>,
    capacity: usize,
    /// Requests admitted (running or waiting).
    admitted: Arc<AtomicUsize>,
    limit: usize,
}

/// A running generation's slot; released on drop (also when the client disconnects).
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    admitted: Arc<AtomicUsize>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.admitted.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Scheduler {
    pub fn new(concurrency: usize, queue: usize) -> Self {
        Scheduler { slots: Arc::new(Semaphore::new(concurrency)), capacity: concurrency, admitted: Arc::new(AtomicUsize::new(0)), limit: concurrency + queue }
    }

    /// Wait for a slot, or 429 at once if the queue is full.
    pub async fn acquire(&self) -> Result<Slot, ApiError> {
        if self.admitted.fetch_add(1, Ordering::SeqCst) >= self.limit {
            self.admitted.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::busy());
        }
        match self.slots.clone().acquire_owned().await {
            Ok(p) => Ok(Slot { _permit: p, admitted: self.admitted.clone() }),
            Err(_) => {
                self.admitted.fetch_sub(1, Ordering::SeqCst);
                Err(ApiError::internal("scheduler closed"))
            }
        }
    }

    pub fn active(&self) -> usize {
        self.capacity - self.slots.available_permits()
    }

    pub fn queued(&self) -> usize {
        self.admitted.load(Ordering::SeqCst).saturating_sub(self.active())
    }
}
