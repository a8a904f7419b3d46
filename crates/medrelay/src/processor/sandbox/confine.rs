//! How a sandbox child confines itself before it reads a byte of the document: resource
//! limits first (address space, CPU time, no file growth, no new file descriptors), then a
//! seccomp filter (no sockets, no exec, no new processes, no signals to anyone else). Both are
//! inherited by the threads a parser starts afterwards and cannot be lifted again.

use std::collections::BTreeMap;

use anyhow::Context;
use rustix::process::{Resource, Rlimit, setrlimit};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::Limits;

/// Applies every limit to this (still single-threaded) process.
pub fn confine(limits: &Limits) -> anyhow::Result<()> {
    let hard = |value: u64| Rlimit {
        current: Some(value),
        maximum: Some(value),
    };
    setrlimit(Resource::As, hard(limits.memory)).context("limiting the address space")?;
    // SIGXCPU at the soft limit, SIGKILL one second later.
    setrlimit(
        Resource::Cpu,
        Rlimit {
            current: Some(limits.cpu_secs),
            maximum: Some(limits.cpu_secs + 1),
        },
    )
    .context("limiting CPU time")?;
    setrlimit(Resource::Fsize, hard(0)).context("forbidding file writes")?;
    // stdin, stdout and stderr stay open; nothing else can be opened: no file, no socket.
    setrlimit(Resource::Nofile, hard(3)).context("forbidding new descriptors")?;
    setrlimit(Resource::Core, hard(0)).context("forbidding core dumps")?;
    for filter in filters()? {
        seccompiler::apply_filter(&filter).context("installing the seccomp filter")?;
    }
    Ok(())
}

fn arch() -> anyhow::Result<TargetArch> {
    Ok(match std::env::consts::ARCH {
        "x86_64" => TargetArch::x86_64,
        "aarch64" => TargetArch::aarch64,
        "riscv64" => TargetArch::riscv64,
        other => anyhow::bail!("no seccomp filter for {other}"),
    })
}

/// A condition on syscall argument `arg`.
fn arg(arg: u8, op: SeccompCmpOp, value: u64) -> anyhow::Result<SeccompCondition> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)
        .context("building a seccomp condition")
}

/// Two filters, because a filter has one action for every match: `clone3` must fail with
/// ENOSYS (so that the C library falls back to `clone`, which the second filter checks), the
/// rest with EPERM. Every other syscall is allowed: the limits above already close files and
/// sockets; this shuts the doors they do not.
fn filters() -> anyhow::Result<Vec<BpfProgram>> {
    let arch = arch()?;
    let own_pid = u64::from(
        rustix::process::getpid()
            .as_raw_nonzero()
            .get()
            .unsigned_abs(),
    );
    let mut denied: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for syscall in [
        libc::SYS_socket,
        libc::SYS_socketpair,
        libc::SYS_connect,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_accept,
        libc::SYS_accept4,
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_tkill,
        libc::SYS_rt_sigqueueinfo,
        libc::SYS_rt_tgsigqueueinfo,
        libc::SYS_pidfd_open,
        libc::SYS_pidfd_send_signal,
        #[cfg(target_arch = "x86_64")]
        libc::SYS_fork,
        #[cfg(target_arch = "x86_64")]
        libc::SYS_vfork,
    ] {
        denied.insert(syscall, Vec::new());
    }
    // Threads, yes (a parser may start some); new processes, no.
    denied.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![arg(
            0,
            SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
            0,
        )?])?],
    );
    // Signals to this process only (abort() raises SIGABRT on itself).
    for syscall in [libc::SYS_kill, libc::SYS_tgkill] {
        denied.insert(
            syscall,
            vec![SeccompRule::new(vec![arg(0, SeccompCmpOp::Ne, own_pid)?])?],
        );
    }
    let eperm = SeccompFilter::new(
        denied,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )?;
    let no_clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )?;
    Ok(vec![no_clone3.try_into()?, eperm.try_into()?])
}
