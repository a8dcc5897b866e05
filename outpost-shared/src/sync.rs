//! The workspace's one policy for poisoned locks.
//!
//! A `std::sync::Mutex` is poisoned when a thread panics while holding it. Both programs guard
//! only state that is consistent between statements (a table updated by one insert or one
//! remove, never a multi-step update left half done across a call that can panic), and a panic
//! is already reported by the panic hook where it happened. So a poisoned lock is taken back and
//! used: one request's panic must not turn every later request that touches the same table into
//! a panic too, which is what `.lock().unwrap()` would do.
//!
//! **Invariant:** the workspace's code (both programs, the shared crate and the test kit) takes
//! `std::sync::Mutex` guards only through [`lock`].

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, taking the guard back if a panicking thread poisoned it (see the module docs
/// for why that is safe here).
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_is_taken_back_with_its_value() {
        let mutex = std::sync::Arc::new(Mutex::new(vec![1]));
        let shared = mutex.clone();
        let panicked = std::thread::spawn(move || {
            let mut guard = shared.lock().unwrap();
            guard.push(2);
            panic!("a handler panics while holding the lock");
        })
        .join();
        assert!(panicked.is_err());
        assert!(mutex.is_poisoned());
        assert_eq!(*lock(&mutex), vec![1, 2]);
    }
}
