"""The sandbox's seccomp filter: the system calls sandboxed code may not make, compiled once to BPF for bwrap.

Namespaces hide the host; they do not shrink the kernel a program can talk to. This filter takes away the
system calls that sandboxed Python never needs and that kernel exploits and escapes are made of (the same
families Docker's default profile refuses): tracing other processes, mounting, new namespaces, loading
kernel modules or BPF programs, keyrings, io_uring, userfaultfd, perf events, raw and netlink sockets,
changing the clock. A refused call fails with EPERM (clone3 with ENOSYS, so the C library falls back to
clone, whose flags the filter can read); system calls of another ABI (i386, x32) kill the process.

libseccomp (Debian's libseccomp2, which apt itself needs) compiles the rules through `pyseccomp`, a thin
ctypes binding; bwrap loads the program (`--seccomp FD`) after setting up the namespaces, just before it
execs the launcher, so the filter binds the program and every child.
"""

from __future__ import annotations

import errno
import functools
import tempfile

from fleetlm.errors import FleetError

# Each refused outright: none is needed by Python programs, and each has a history of escapes or exploits.
REFUSED_SYSCALLS = (
    # other processes' memory and execution
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    # filesystems and mounts (a user namespace would otherwise let root-in-namespace mount things)
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsconfig",
    "fsmount", "fspick", "mount_setattr", "name_to_handle_at", "open_by_handle_at", "quotactl",
    "quotactl_fd",
    # namespaces
    "unshare", "setns",
    # the kernel itself: modules, kexec, BPF, perf, keyrings, io_uring, userfaultfd, personality, logs
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "bpf",
    "perf_event_open", "add_key", "request_key", "keyctl", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "userfaultfd", "personality", "syslog", "lookup_dcookie", "uselib",
    "iopl", "ioperm", "acct", "swapon", "swapoff", "reboot", "vhangup", "nfsservctl",
    # the machine's clock and identity
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname",
    # NUMA and page moves (memory layout probing, CVEs in the past)
    "move_pages", "migrate_pages", "mbind", "set_mempolicy",
)

# clone() flags that would make a namespace; refused one bit at a time (a rule compares one masked value).
NAMESPACE_FLAGS = {
    "CLONE_NEWTIME": 0x00000080, "CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000, "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000, "CLONE_NEWNET": 0x40000000,
}

# Socket families allowed: Unix (the tool bridge), IPv4 and IPv6 (only the namespace's own loopback exists).
AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10


class SeccompUnavailable(FleetError):
    """libseccomp cannot be loaded here, so the filter cannot be built (the sandbox then refuses to run)."""


@functools.cache
def filter_bpf() -> bytes:
    """The compiled filter, as the BPF program bwrap's --seccomp reads (built once per process)."""
    try:
        import pyseccomp as sc
    except (ImportError, OSError) as exc:  # pyseccomp loads libseccomp.so.2 at import
        raise SeccompUnavailable(f"libseccomp is not available ({exc}); apt-get install libseccomp2") from exc
    f = sc.SyscallFilter(sc.ALLOW)
    f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)  # i386 / x32 entry points would bypass every rule
    refuse = sc.ERRNO(errno.EPERM)
    for name in REFUSED_SYSCALLS:
        try:
            f.add_rule(refuse, name)
        except OSError:
            continue  # a call this kernel's tables do not know (old libseccomp): nothing to refuse
    for bit in NAMESPACE_FLAGS.values():
        f.add_rule(refuse, "clone", sc.Arg(0, sc.MASKED_EQ, bit, bit))
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")  # its flags live behind a pointer: make libc use clone
    for family in (0, *range(AF_INET + 1, AF_INET6)):
        f.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), "socket", sc.Arg(0, sc.EQ, family))
    f.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), "socket", sc.Arg(0, sc.GT, AF_INET6))  # netlink, packet, ...
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        return out.read()
