// SPDX-License-Identifier: GPL-2.0
/*
 * A patch that cannot fit: its 3 MiB buffer is larger than the whole patch area (2 MiB).
 * Applying it must be refused before anything is written to the guest.
 */
#include <linux/printk.h>

static char history[3 << 20];

void livepatch_sysrq_handle_showmem(int key)
{
	history[key & 0xff]++;
	pr_info("sysrq %c seen %d times\n", key, history[key & 0xff]);
}
