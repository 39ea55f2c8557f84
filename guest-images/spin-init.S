/*
 * PID 1 for kernel-only guests (rdinit=/spin-init): spins in user mode and makes no
 * system call. On hosts whose KVM cannot complete SYSCALL from guest user mode
 * (`vmm host-check`, docs/pvm.md) every real init dies at its first system call and the
 * kernel panics; with this one the kernel keeps running, so introspection, snapshots and
 * live patches can still be tested against it. Kernel output (e.g. magic SysRq through a
 * serial break) is the only conversation with such a guest.
 */
    .globl _start
    .text
_start:
1:  pause
    jmp 1b
