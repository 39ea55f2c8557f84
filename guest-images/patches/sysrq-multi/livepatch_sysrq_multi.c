// SPDX-License-Identifier: GPL-2.0
/*
 * Replacements for three SysRq handlers of a kernel-only guest, each printing a marker
 * with its key instead of doing its work: 'm' (show memory), 'w' (show blocked tasks)
 * and the loglevel digits. The manifests next to this file pick one each (or, for the
 * cumulative bundle, the one it carries), which gives the kernel selftests' "multiple
 * livepatches" and "atomic replace" scenarios functions the serial console can observe.
 */
#include <linux/printk.h>

void livepatch_sysrq_handle_showmem(int key)
{
	pr_info("this has been live patched (sysrq %c)\n", key);
}

void livepatch_sysrq_handle_showstate_blocked(int key)
{
	pr_info("this has been live patched (sysrq %c)\n", key);
}

void livepatch_sysrq_handle_loglevel(int key)
{
	pr_info("this has been live patched (sysrq %c)\n", key);
}
