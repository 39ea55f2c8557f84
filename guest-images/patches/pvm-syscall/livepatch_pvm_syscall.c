// SPDX-License-Identifier: GPL-2.0
/*
 * System calls for guest user space on PVM hosts, as a live patch applied from the host.
 *
 * Under PVM (docs/pvm.md), SYSCALL from guest user mode does everything but the switch to
 * CPL 0: RCX holds the return address, R11 the user RFLAGS, RFLAGS is masked with
 * SFMASK, and RIP becomes MSR_LSTAR (entry_SYSCALL_64), still at CPL 3. Fetching the
 * kernel's entry code from user mode then faults, and that page fault *is* delivered
 * properly: through the IDT, on the kernel stack, at CPL 0, with the user's registers in
 * pt_regs. The kernel would answer it with SIGSEGV from bad_area_nosemaphore().
 *
 * This replacement recognises that one fault (a user-mode instruction fetch at exactly
 * entry_SYSCALL_64) and performs the system call the way do_syscall_64() does, in the
 * page fault's own entry context, which already did the user-to-kernel transition work:
 * pt_regs are set up as entry_SYSCALL_64 leaves them (orig_ax = the number, ax = -ENOSYS,
 * ip = RCX, flags = R11), then the entry work, the call, and the exit work; the fault's
 * exit path returns to user space with IRET (the kernel's own slow path for system
 * calls). A restarted system call backs ip up over the 2-byte SYSCALL as usual, and
 * faults here again. Every other fault takes the original path.
 */
#include <linux/entry-common.h>
#include <linux/irqflags.h>
#include <linux/nospec.h>
#include <linux/printk.h>
#include <linux/ptrace.h>
#include <asm/proto.h>
#include <asm/syscall.h>
#include <asm/trap_pf.h>
#include <asm/unistd.h>

/* Static in arch/x86/mm/fault.c; resolved from the guest's kallsyms. */
void __bad_area_nosemaphore(struct pt_regs *regs, unsigned long error_code,
			    unsigned long address, u32 pkey, int si_code);

/* What SYSRET would load into RFLAGS from R11. */
#define SYSRET_FLAGS_MASK 0x3c7fd7UL

static bool livepatch_pvm_syscall_seen;

static void livepatch_syscall_from_fault(struct pt_regs *regs)
{
	unsigned long nr;

	regs->ip = regs->cx;
	regs->flags = (regs->r11 & SYSRET_FLAGS_MASK) | X86_EFLAGS_FIXED | X86_EFLAGS_IF;
	regs->orig_ax = regs->ax;
	regs->ax = -ENOSYS;
	if (!READ_ONCE(livepatch_pvm_syscall_seen)) {
		WRITE_ONCE(livepatch_pvm_syscall_seen, true);
		pr_info("pvm-syscall: system calls from user mode are completed by the live patch\n");
	}

	/* SFMASK left interrupts off; the entry work expects them on. */
	native_irq_enable();
	nr = syscall_enter_from_user_mode_work(regs, regs->orig_ax);
	if (likely(nr < NR_syscalls)) {
		nr = array_index_nospec(nr, NR_syscalls);
		regs->ax = x64_sys_call(regs, nr);
	}
	/* Returns with interrupts off, as the page fault's exit path wants them. */
	syscall_exit_to_user_mode_work(regs);
}

void livepatch_bad_area_nosemaphore(struct pt_regs *regs, unsigned long error_code,
				    unsigned long address)
{
	if (user_mode(regs) && (error_code & X86_PF_INSTR) &&
	    address == (unsigned long)entry_SYSCALL_64 && regs->ip == address) {
		livepatch_syscall_from_fault(regs);
		return;
	}
	__bad_area_nosemaphore(regs, error_code, address, 0, SEGV_MAPERR);
}
