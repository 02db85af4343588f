//! Taking a vCPU thread out of `KVM_RUN`: for the end of a nested time
//! slice, and to stop a host VM.
//!
//! A kick sets `immediate_exit` in the target `kvm_run` (so a thread that is
//! about to enter returns at once) and sends a real-time signal with an
//! empty handler to the thread (so one already inside returns with EINTR).
//! The slice timer is one helper thread per vCPU thread that kicks at a
//! deadline unless disarmed first.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::{Duration, Instant};

/// The signal used for kicks.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick handler once per process.
pub fn install_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .expect("the kick signal is a valid real-time signal");
    });
}

/// Sends the kick signal to a thread.
pub fn signal_thread(thread: libc::pthread_t) {
    // SAFETY: `thread` names a live thread of this process (callers keep the
    // thread joined only after the last kick); the handler is installed.
    unsafe {
        libc::pthread_kill(thread, kick_signal());
    }
}

/// Sets `immediate_exit` through a raw `kvm_run` pointer.
///
/// # Safety
/// `run` must point at the `immediate_exit` byte of a live `kvm_run` mapping.
pub unsafe fn set_immediate_exit(run: *const AtomicU8) {
    // SAFETY: guaranteed by the caller.
    unsafe { (*run).store(1, Ordering::SeqCst) };
}

struct Armed {
    deadline: Instant,
    gen: u64,
    run: usize,
}

struct TimerState {
    armed: Option<Armed>,
    gen: u64,
    quit: bool,
}

/// Kicks one thread at a deadline.
pub struct SliceTimer {
    shared: Arc<(Mutex<TimerState>, Condvar)>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl SliceTimer {
    /// A timer that kicks `target`.
    pub fn new(target: libc::pthread_t) -> SliceTimer {
        install_handler();
        let shared = Arc::new((
            Mutex::new(TimerState {
                armed: None,
                gen: 0,
                quit: false,
            }),
            Condvar::new(),
        ));
        let s = shared.clone();
        let target = target as usize;
        let handle = std::thread::Builder::new()
            .name("vmbeam-slice".into())
            .spawn(move || {
                let (m, cv) = &*s;
                let mut st = m.lock().unwrap();
                loop {
                    if st.quit {
                        return;
                    }
                    match &st.armed {
                        None => st = cv.wait(st).unwrap(),
                        Some(a) => {
                            let now = Instant::now();
                            if now >= a.deadline {
                                // SAFETY: `run` was given by `arm`, whose caller
                                // keeps the kvm_run mapping alive until `disarm`,
                                // which needs this lock.
                                unsafe { set_immediate_exit(a.run as *const AtomicU8) };
                                signal_thread(target as libc::pthread_t);
                                st.armed = None;
                            } else {
                                let wait = a.deadline - now;
                                st = cv.wait_timeout(st, wait).unwrap().0;
                            }
                        }
                    }
                }
            })
            .expect("spawn slice timer thread");
        SliceTimer {
            shared,
            handle: Some(handle),
        }
    }

    /// Arms the timer: after `slice`, set the byte at `immediate_exit` and kick.
    ///
    /// # Safety
    /// `immediate_exit` must stay a valid `kvm_run.immediate_exit` pointer
    /// until [`SliceTimer::disarm`] returns.
    pub unsafe fn arm(&self, slice: Duration, immediate_exit: *const AtomicU8) -> u64 {
        let (m, cv) = &*self.shared;
        let mut st = m.lock().unwrap();
        st.gen += 1;
        let gen = st.gen;
        st.armed = Some(Armed {
            deadline: Instant::now() + slice,
            gen,
            run: immediate_exit as usize,
        });
        cv.notify_one();
        gen
    }

    /// Disarms the timer; after this no kick from this arming happens.
    pub fn disarm(&self, gen: u64) {
        let (m, _) = &*self.shared;
        let mut st = m.lock().unwrap();
        if st.armed.as_ref().map(|a| a.gen) == Some(gen) {
            st.armed = None;
        }
    }
}

impl Drop for SliceTimer {
    fn drop(&mut self) {
        {
            let (m, cv) = &*self.shared;
            m.lock().unwrap().quit = true;
            cv.notify_one();
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
