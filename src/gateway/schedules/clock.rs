//! Sleeping until a wall-clock time. On Linux a `timerfd` on `CLOCK_REALTIME` with an
//! absolute expiry: it fires at that wall-clock time even across a suspend, and with
//! `TFD_TIMER_CANCEL_ON_SET` it wakes at once when the clock is set (NTP stepping it, an
//! operator changing it), so the scheduler computes its next slot again. Elsewhere (macOS)
//! a monotonic sleep until then.
//!
//! The one `unsafe` block registers the timer's descriptor with the runtime's reactor.

use std::time::Duration;

/// Why [`until`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woke {
    /// The time came.
    Due,
    /// The wall clock was set: compute again.
    ClockChanged,
}

/// Waits until the wall clock reads `at_ms` (milliseconds since the Unix epoch).
pub async fn until(at_ms: i64) -> Woke {
    #[cfg(target_os = "linux")]
    match timerfd::until(at_ms).await {
        Ok(w) => return w,
        Err(e) => tracing::warn!(
            "timerfd unavailable ({e}): sleeping on the monotonic clock; a wall-clock change is noticed at the next slot"
        ),
    }
    let left = at_ms - crate::store::now_ms();
    if left > 0 {
        tokio::time::sleep(Duration::from_millis(left as u64)).await;
    }
    Woke::Due
}

#[cfg(target_os = "linux")]
mod timerfd {
    use std::os::fd::{AsFd, AsRawFd, RawFd};

    use nix::errno::Errno;
    use nix::sys::time::TimeSpec;
    use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
    use tokio::io::Interest;
    use tokio::io::unix::AsyncFd;

    use super::Woke;

    /// `AsyncFd` wants `AsRawFd`; `TimerFd` gives `AsFd`.
    struct Timer(TimerFd);

    impl AsRawFd for Timer {
        fn as_raw_fd(&self) -> RawFd {
            self.0.as_fd().as_raw_fd()
        }
    }

    pub(super) async fn until(at_ms: i64) -> std::io::Result<Woke> {
        let fd = TimerFd::new(
            ClockId::CLOCK_REALTIME,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        let at = at_ms.max(1);
        // A time in the past fires at once.
        let spec = TimeSpec::new(at / 1000, (at % 1000) * 1_000_000);
        fd.set(
            Expiration::OneShot(spec),
            TimerSetTimeFlags::TFD_TIMER_ABSTIME | TimerSetTimeFlags::TFD_TIMER_CANCEL_ON_SET,
        )?;
        // SAFETY: `Timer` owns the timerfd (a `TimerFd` holds an `OwnedFd`) and hands out
        // that one descriptor from `as_raw_fd`; nothing takes it out or closes it before
        // the `AsyncFd`, which owns the `Timer`, is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(Timer(fd), Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        loop {
            let mut ready = fd.readable().await?;
            let mut buf = [0u8; 8];
            match ready.try_io(|t| {
                nix::unistd::read(t.get_ref().0.as_fd(), &mut buf).map_err(std::io::Error::from)
            }) {
                Ok(Ok(_)) => return Ok(Woke::Due),
                Ok(Err(e)) if e.raw_os_error() == Some(Errno::ECANCELED as i32) => {
                    return Ok(Woke::ClockChanged);
                }
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(e),
                // Not readable after all: wait again.
                Err(_) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn it_wakes_at_the_wall_clock_time_and_at_once_for_a_past_one() {
        let t = std::time::Instant::now();
        assert_eq!(until(crate::store::now_ms() - 5000).await, Woke::Due);
        assert!(t.elapsed() < Duration::from_millis(100));
        let at = crate::store::now_ms() + 300;
        assert_eq!(until(at).await, Woke::Due);
        assert!(crate::store::now_ms() >= at);
        assert!(t.elapsed() < Duration::from_millis(1000));
    }
}
