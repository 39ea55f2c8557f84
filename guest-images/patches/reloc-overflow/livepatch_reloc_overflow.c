// SPDX-License-Identifier: GPL-2.0
/*
 * A patch whose code builds but cannot be linked into the guest: it stores the address
 * of a kernel variable in 32 zero-extended bits (an R_X86_64_32 relocation). Kernel
 * addresses lie in the top 2 GiB, so no value fits. Applying it must be refused with a
 * message naming the relocation, before anything is written to the guest.
 */
#include <linux/jiffies.h>
#include <linux/printk.h>
#include <linux/types.h>

asm(".pushsection .rodata, \"a\"\n"
    "\t.balign 4\n"
    "livepatch_jiffies_low32:\n"
    "\t.long jiffies\n"
    "\t.popsection\n");

extern const u32 livepatch_jiffies_low32;

void livepatch_sysrq_handle_showmem(int key)
{
	pr_info("sysrq %c: jiffies is at %#x\n", key, livepatch_jiffies_low32);
}
