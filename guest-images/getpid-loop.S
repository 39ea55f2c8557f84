/*
 * A user-space load for live-patch tests: calls getpid() in a tight loop until killed.
 * A test runs several of these while it replaces the kernel's __x64_sys_getpid, so the
 * transition happens while processes keep entering the function (tests/tests/boot.rs).
 */
    .globl _start
    .text
_start:
1:  mov $39, %eax       /* __NR_getpid */
    syscall
    jmp 1b
