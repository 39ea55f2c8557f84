// SPDX-License-Identifier: GPL-2.0
/*
 * The classic live-patch sample: /proc/cmdline reads "this has been live patched".
 * Built against the guest kernel's headers by `vmm bundle build`.
 */
#include <linux/seq_file.h>

int livepatch_cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_printf(m, "%s\n", "this has been live patched");
	return 0;
}
