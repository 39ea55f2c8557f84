// SPDX-License-Identifier: GPL-2.0
/*
 * A patch that can never be applied safely: kthreadd (pid 2) sleeps inside kthreadd()
 * for the whole life of the kernel, so the consistency check must keep refusing the
 * transition until its deadline and leave the kernel text as it was. The body is never
 * meant to run.
 */
#include <linux/printk.h>

int livepatch_kthreadd(void *unused)
{
	pr_info("livepatch_kthreadd must never run\n");
	return 0;
}
