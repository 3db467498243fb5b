//! Every thread of rvirt-vmm is started here, named (`vcpu0`, `api`, `serial-in`, ...; visible
//! in /proc/PID/task/*/comm for pinning), and inherits the emulator CPU affinity set on the
//! VMM's main thread, unless it sets its own (vCPUs). Device workers are started from the VMM
//! thread when a device activates, so they inherit the emulator affinity too.

use std::io;
use std::thread::JoinHandle;

/// Starts a thread named `name` (at most 15 bytes are visible to the kernel).
pub fn spawn<T, F>(name: &str, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    std::thread::Builder::new().name(name.to_string()).spawn(f)
}

/// The calling thread's kernel thread id.
pub fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// The host CPUs the calling thread may run on.
pub fn affinity() -> io::Result<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the size passed is its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect())
    }
}

/// Restricts the calling thread to `cpus` (threads it starts afterwards inherit it).
pub fn set_affinity(cpus: &[usize]) -> io::Result<()> {
    if cpus.is_empty() {
        return Ok(());
    }
    if let Some(bad) = cpus.iter().find(|&&c| c >= libc::CPU_SETSIZE as usize) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("host CPU {bad} is out of range"),
        ));
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set; every CPU index was checked against
    // CPU_SETSIZE; the size passed is the set's size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_are_named_and_inherit_affinity() {
        let all = affinity().unwrap();
        let first = all[0];
        let h = spawn("rv-test", move || {
            set_affinity(&[first]).unwrap();
            let comm = std::fs::read_to_string(format!("/proc/self/task/{}/comm", gettid()));
            let child = spawn("rv-child", affinity)
                .unwrap()
                .join()
                .unwrap()
                .unwrap();
            (comm.unwrap(), child)
        })
        .unwrap();
        let (comm, child) = h.join().unwrap();
        assert_eq!(comm.trim(), "rv-test");
        assert_eq!(
            child,
            vec![first],
            "a thread started later inherits the affinity"
        );
        assert!(set_affinity(&[usize::MAX]).is_err());
    }
}
