//! L0's one lock hierarchy, checked.
//!
//! Every mutex of L0's core is a [`RankedMutex`] with a [`Rank`]. A thread
//! may only take a lock of a *higher* rank than every lock it already holds;
//! the order is written once, in [`Rank`] (and in `docs/architecture.md`).
//! In debug builds each thread keeps a stack of the ranks it holds, and
//! taking a lock out of order panics with both names, so a test that would
//! deadlock one day fails at once instead. Release builds skip the check:
//! a `RankedMutex` is then a plain [`Mutex`] and a rank.
//!
//! Waiting on a [`RankedCondvar`] releases the lock for the duration of the
//! wait, so the rank is off the stack while the thread sleeps.

use std::ops::{Deref, DerefMut};
use std::sync::{Condvar, LockResult, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::Duration;

/// The lock hierarchy, outermost first: a lock may be taken while holding
/// only locks that come before it here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rank {
    /// `Vmm::busy`: one rejuvenation or migration at a time (held for the
    /// whole operation, so everything else ranks after it).
    Busy,
    /// `Vmm::lines`: the list of lines.
    Lines,
    /// `Line::current` and `Line::retired`.
    Line,
    /// `Session::successor`: which host VM is the successor.
    SessionSuccessor,
    /// `HostVm::nested`: the table of one host VM's nested VMs (never two
    /// tables at once).
    NestedTable,
    /// One nested VM (held across its RUN; never two at once).
    NestedVm,
    /// One virtio device of a nested VM (its registers, queues, counters):
    /// taken by the nested vCPU inside RUN and by the device's worker.
    Device,
    /// The memory view a nested VM's devices use (replaced when its slots
    /// change; held for a clone).
    DeviceMemory,
    /// `Session::precopied`: pre-copied destinations.
    SessionCopies,
    /// `HostVm::session`: which handover a host VM takes part in.
    VmSession,
    /// `Session::st`: phase and grants of a handover.
    SessionState,
    /// `Shared::records`: guest identities by name.
    Records,
    /// `GuestRecord::info`.
    RecordInfo,
    /// `NestedInfo`: what status reads of a nested VM without its lock.
    NestedInfo,
    /// `Shared::host_vms`: the weak registry of host VMs.
    HostVms,
    /// `HostVm::health`: L1's last health report (readers may ask the
    /// VM's status while holding it).
    Health,
    /// Per host VM bookkeeping leaves: status, health, vCPU threads, slots,
    /// the L0 write log, the UART, resource accounting.
    VmLeaf,
    /// `Shared::bindings`: device backends by guest name.
    Bindings,
    /// `ConsoleHub::consoles`: consoles by name.
    ConsoleHub,
    /// One console (its rate limit).
    Console,
    /// One console file, shared by a host VM line's generations.
    ConsoleFile,
    /// Counters that wake waiters (doorbells, the VM-event counter), the
    /// policy description: taken last, held for a few instructions.
    Signal,
}

#[cfg(debug_assertions)]
mod held {
    use super::Rank;
    use std::cell::RefCell;

    thread_local! {
        static HELD: RefCell<Vec<(Rank, usize)>> = const { RefCell::new(Vec::new()) };
    }

    /// Panics if a lock of rank `r` may not be taken now.
    pub fn check(r: Rank, what: &'static str) {
        HELD.with(|h| {
            if let Some((top, _)) = h.borrow().iter().max_by_key(|(k, _)| *k) {
                if *top >= r {
                    panic!(
                        "lock order violated: taking {r:?} ({what}) while holding {top:?}; \
                         see Rank in sync.rs for the order"
                    );
                }
            }
        });
    }

    pub fn push(r: Rank, id: usize) {
        HELD.with(|h| h.borrow_mut().push((r, id)));
    }

    pub fn pop(r: Rank, id: usize) {
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            if let Some(i) = h.iter().rposition(|e| *e == (r, id)) {
                h.remove(i);
            }
        });
    }

    /// Ranks this thread holds now (tests).
    pub fn ranks() -> Vec<Rank> {
        HELD.with(|h| h.borrow().iter().map(|(r, _)| *r).collect())
    }
}

/// Ranks of the locks this thread holds now (always empty in release
/// builds, which do not track them).
pub fn held_ranks() -> Vec<Rank> {
    #[cfg(debug_assertions)]
    {
        held::ranks()
    }
    #[cfg(not(debug_assertions))]
    {
        Vec::new()
    }
}

/// A mutex with a place in the lock hierarchy.
#[derive(Debug, Default)]
pub struct RankedMutex<T> {
    rank: RankOf,
    inner: Mutex<T>,
}

/// The rank of a mutex (a wrapper so `RankedMutex` can derive `Default`
/// for leaves).
#[derive(Debug, Clone, Copy)]
struct RankOf(Rank);

impl Default for RankOf {
    fn default() -> Self {
        RankOf(Rank::VmLeaf)
    }
}

/// Holds a [`RankedMutex`]; releases it (and its rank) when dropped.
pub struct RankedGuard<'a, T> {
    guard: Option<MutexGuard<'a, T>>,
    #[cfg(debug_assertions)]
    rank: Rank,
    #[cfg(debug_assertions)]
    id: usize,
}

impl<T> RankedMutex<T> {
    /// A mutex of rank `rank` holding `value`.
    pub const fn new(rank: Rank, value: T) -> Self {
        RankedMutex {
            rank: RankOf(rank),
            inner: Mutex::new(value),
        }
    }

    /// Its rank.
    pub fn rank(&self) -> Rank {
        self.rank.0
    }

    /// Its identity in the debug-build record of held locks.
    #[cfg(debug_assertions)]
    fn id(&self) -> usize {
        &self.inner as *const Mutex<T> as usize
    }

    fn wrap<'a>(&'a self, g: MutexGuard<'a, T>) -> RankedGuard<'a, T> {
        #[cfg(debug_assertions)]
        held::push(self.rank.0, self.id());
        RankedGuard {
            guard: Some(g),
            #[cfg(debug_assertions)]
            rank: self.rank.0,
            #[cfg(debug_assertions)]
            id: self.id(),
        }
    }

    /// Takes the lock. In debug builds, panics if the calling thread
    /// holds a lock of this rank or a later one.
    pub fn lock(&self) -> LockResult<RankedGuard<'_, T>> {
        #[cfg(debug_assertions)]
        held::check(self.rank.0, std::any::type_name::<T>());
        match self.inner.lock() {
            Ok(g) => Ok(self.wrap(g)),
            Err(p) => Err(PoisonError::new(self.wrap(p.into_inner()))),
        }
    }

    /// Takes the lock if it is free (never blocks, so never deadlocks: no
    /// order check, but the rank is held like after [`RankedMutex::lock`]).
    pub fn try_lock(&self) -> Result<RankedGuard<'_, T>, TryLockError<RankedGuard<'_, T>>> {
        match self.inner.try_lock() {
            Ok(g) => Ok(self.wrap(g)),
            Err(TryLockError::Poisoned(p)) => Err(TryLockError::Poisoned(PoisonError::new(
                self.wrap(p.into_inner()),
            ))),
            Err(TryLockError::WouldBlock) => Err(TryLockError::WouldBlock),
        }
    }

    /// Mutable access without locking (the caller owns the mutex).
    pub fn get_mut(&mut self) -> LockResult<&mut T> {
        self.inner.get_mut()
    }

    /// The value, consuming the mutex.
    pub fn into_inner(self) -> LockResult<T> {
        self.inner.into_inner()
    }
}

impl<T> Deref for RankedGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.guard.as_ref().expect("guard is held until dropped")
    }
}

impl<T> DerefMut for RankedGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.guard.as_mut().expect("guard is held until dropped")
    }
}

impl<T> Drop for RankedGuard<'_, T> {
    fn drop(&mut self) {
        if self.guard.take().is_some() {
            #[cfg(debug_assertions)]
            held::pop(self.rank, self.id);
        }
    }
}

/// A condition variable for [`RankedMutex`]es.
#[derive(Debug, Default)]
pub struct RankedCondvar(Condvar);

/// What [`RankedCondvar::wait_timeout`] returns: the guard, and whether
/// the wait timed out.
pub type WaitResult<'a, T> = LockResult<(RankedGuard<'a, T>, std::sync::WaitTimeoutResult)>;

impl RankedCondvar {
    /// A new condition variable.
    pub const fn new() -> Self {
        RankedCondvar(Condvar::new())
    }

    /// Wakes every waiter.
    pub fn notify_all(&self) {
        self.0.notify_all();
    }

    /// Releases `guard`'s lock, waits up to `dur` for a notification, and
    /// takes the lock again.
    pub fn wait_timeout<'a, T>(
        &self,
        guard: RankedGuard<'a, T>,
        dur: Duration,
    ) -> WaitResult<'a, T> {
        self.wait_with(guard, |cv, g| cv.wait_timeout(g, dur))
    }

    /// Like [`Condvar::wait_timeout_while`]: waits while `cond` holds, up
    /// to `dur` in all.
    pub fn wait_timeout_while<'a, T>(
        &self,
        guard: RankedGuard<'a, T>,
        dur: Duration,
        cond: impl FnMut(&mut T) -> bool,
    ) -> WaitResult<'a, T> {
        self.wait_with(guard, |cv, g| cv.wait_timeout_while(g, dur, cond))
    }

    fn wait_with<'a, T>(
        &self,
        mut guard: RankedGuard<'a, T>,
        wait: impl FnOnce(
            &Condvar,
            MutexGuard<'a, T>,
        ) -> LockResult<(MutexGuard<'a, T>, std::sync::WaitTimeoutResult)>,
    ) -> WaitResult<'a, T> {
        let g = guard.guard.take().expect("guard is held until dropped");
        #[cfg(debug_assertions)]
        held::pop(guard.rank, guard.id);
        let (g, timed_out, poisoned) = match wait(&self.0, g) {
            Ok((g, t)) => (g, t, false),
            Err(p) => {
                let (g, t) = p.into_inner();
                (g, t, true)
            }
        };
        #[cfg(debug_assertions)]
        held::push(guard.rank, guard.id);
        guard.guard = Some(g);
        if poisoned {
            Err(PoisonError::new((guard, timed_out)))
        } else {
            Ok((guard, timed_out))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_acquisition_is_fine_and_tracked() {
        let a = RankedMutex::new(Rank::Lines, 1);
        let b = RankedMutex::new(Rank::NestedVm, 2);
        {
            let ga = a.lock().unwrap();
            let gb = b.lock().unwrap();
            assert_eq!(*ga + *gb, 3);
            if cfg!(debug_assertions) {
                assert_eq!(held_ranks(), vec![Rank::Lines, Rank::NestedVm]);
            }
            // Out-of-LIFO release is fine.
            drop(ga);
            drop(gb);
        }
        assert!(held_ranks().is_empty());
        // After release, any order again.
        drop(b.lock().unwrap());
        drop(a.lock().unwrap());
    }

    #[test]
    #[cfg(debug_assertions)]
    fn out_of_order_acquisition_panics_with_both_names() {
        let outer = RankedMutex::new(Rank::SessionState, ());
        let inner = RankedMutex::new(Rank::NestedTable, ());
        let r = std::thread::spawn(move || {
            let _g = outer.lock().unwrap();
            let _h = inner.lock().unwrap();
        })
        .join();
        let msg = r.unwrap_err();
        let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(
            msg.contains("NestedTable") && msg.contains("SessionState"),
            "{msg}"
        );
    }

    #[test]
    #[cfg(debug_assertions)]
    fn two_locks_of_one_rank_panic() {
        let a = RankedMutex::new(Rank::NestedVm, ());
        let b = RankedMutex::new(Rank::NestedVm, ());
        let r = std::thread::spawn(move || {
            let _g = a.lock().unwrap();
            let _h = b.lock().unwrap();
        })
        .join();
        assert!(r.is_err());
    }

    #[test]
    fn condvar_wait_releases_the_rank() {
        let m = std::sync::Arc::new(RankedMutex::new(Rank::SessionState, 0u32));
        let cv = std::sync::Arc::new(RankedCondvar::new());
        let (m2, cv2) = (m.clone(), cv.clone());
        let t = std::thread::spawn(move || {
            let g = m2.lock().unwrap();
            let (g, _) = cv2
                .wait_timeout_while(g, Duration::from_secs(10), |v| *v == 0)
                .unwrap();
            *g
        });
        std::thread::sleep(Duration::from_millis(20));
        *m.lock().unwrap() = 7;
        cv.notify_all();
        assert_eq!(t.join().unwrap(), 7);
        let g = m.lock().unwrap();
        let (g, timed_out) = cv.wait_timeout(g, Duration::from_millis(1)).unwrap();
        assert!(timed_out.timed_out());
        drop(g);
        assert!(held_ranks().is_empty());
    }
}
