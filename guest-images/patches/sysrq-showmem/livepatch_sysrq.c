// SPDX-License-Identifier: GPL-2.0
/*
 * A live patch observable from a kernel-only guest: SysRq 'm' (show memory) prints a
 * marker instead. On hosts where guest user space cannot run (docs/pvm.md) the serial
 * console's SysRq is the guest's only voice, so this plays the role of the classic
 * /proc/cmdline sample.
 */
#include <linux/printk.h>

void livepatch_sysrq_handle_showmem(int key)
{
	pr_info("this has been live patched (sysrq %c)\n", key);
}
