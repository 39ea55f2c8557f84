// SPDX-License-Identifier: GPL-2.0
/*
 * The second function of the kernel livepatch selftests: /proc/meminfo prints one line
 * saying it has been live patched, in place of the memory counters. With the classic
 * /proc/cmdline sample it gives the "multiple livepatches" and "atomic replace"
 * scenarios two functions guest user space can read.
 */
#include <linux/seq_file.h>

int livepatch_meminfo_proc_show(struct seq_file *m, void *v)
{
	seq_puts(m, "meminfo: this has been live patched\n");
	return 0;
}
