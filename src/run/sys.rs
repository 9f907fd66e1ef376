//! The two libc calls `gitstate run` needs that std does not offer: a signal to a process or
//! a process group, and which process group owns the terminal. The crate's only unsafe code.
#![allow(unsafe_code)]

use std::os::unix::io::RawFd;

/// kill(2): `signal` to the process `target` (a negative `target` is a process group).
pub fn kill(target: libc::pid_t, signal: libc::c_int) -> std::io::Result<()> {
    // SAFETY: kill(2) has no memory effects.
    if unsafe { libc::kill(target, signal) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the foreground process group of the terminal open at `tty` is this process's own.
pub fn owns_terminal(tty: RawFd) -> bool {
    // SAFETY: plain queries on a descriptor the caller holds open.
    let (foreground, ours) = unsafe { (libc::tcgetpgrp(tty), libc::getpgrp()) };
    foreground != -1 && foreground == ours
}
