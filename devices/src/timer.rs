//! Timers for event loops. A timerfd that epoll reported readable may have been re-armed or
//! cleared by another event of the same batch before its own event is handled; a blocking
//! read would then wait for an expiry that never comes, and the loop's thread with it. These
//! timers never block: a read with nothing due just fails with `EAGAIN`.

use std::io;
use std::os::fd::AsRawFd;

use vmm_sys_util::timerfd::TimerFd;

/// A disarmed monotonic timer whose reads never block.
pub fn nonblocking() -> io::Result<TimerFd> {
    let timer = TimerFd::new().map_err(io::Error::from)?;
    let fd = timer.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(timer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_with_nothing_due_returns_at_once() {
        let mut timer = nonblocking().unwrap();
        assert!(timer.wait().is_err(), "disarmed: nothing to read, and no wait");
        timer.reset(std::time::Duration::from_millis(1), None).unwrap();
        timer.clear().unwrap();
        assert!(timer.wait().is_err(), "cleared before it fired");
    }
}
