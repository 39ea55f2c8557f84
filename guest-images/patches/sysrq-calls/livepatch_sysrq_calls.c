// SPDX-License-Identifier: GPL-2.0
/*
 * A replacement that reaches into the kernel the way real fixes do: it calls a static
 * (non-exported) function whose name is not unique (the second `pgd_val` in kallsyms,
 * chosen by sympos in the manifest), reads global variables (`jiffies` and, through
 * totalram_pages(), `_totalram_pages`) and a per-CPU one (`cpu_number`, through
 * raw_smp_processor_id()). SysRq 'w' (show blocked tasks) prints what it found instead.
 */
#include <linux/printk.h>
#include <linux/smp.h>
#include <linux/jiffies.h>
#include <linux/mm.h>

/* The kernel's own out-of-line copy of the paravirt pgd_val(), under a name of our own:
 * the headers define pgd_val as a static inline. */
extern unsigned long livepatch_kernel_pgd_val(unsigned long pgd) __asm__("pgd_val");

void livepatch_sysrq_handle_showstate_blocked(int key)
{
	unsigned long probe = 0x1000;

	pr_info("this has been live patched (sysrq %c): cpu %d, jiffies %lu, totalram %lu pages, pgd_val(%#lx) = %#lx\n",
		key, raw_smp_processor_id(), jiffies, totalram_pages(), probe,
		livepatch_kernel_pgd_val(probe));
}
