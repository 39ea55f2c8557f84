// SPDX-License-Identifier: GPL-2.0
/*
 * Benchmark helper for a kernel-only guest: SysRq 'w' starts 100 more kernel threads, each a
 * kthread worker sleeping in the core kernel's kthread_worker_fn(), so a benchmark can
 * measure the stop-the-world check with 100 or 1,000 guest threads when guest user space
 * cannot run (docs/pvm.md). The SysRq handler runs in the UART's interrupt, where nothing
 * may sleep: it only queues a work item, and a kworker creates the threads.
 */
#include <linux/kthread.h>
#include <linux/printk.h>
#include <linux/workqueue.h>
#include <linux/err.h>

#define BATCH 100

static int spawned;

static void spawn_batch(struct work_struct *work)
{
	int i;

	for (i = 0; i < BATCH; i++) {
		struct kthread_worker *w = kthread_create_worker(0, "bench/%d", spawned);

		if (IS_ERR(w)) {
			pr_info("spawn-workers: stopped at %d threads (%ld)\n", spawned, PTR_ERR(w));
			return;
		}
		spawned++;
	}
	pr_info("spawn-workers: %d threads\n", spawned);
}

static DECLARE_WORK(spawn_work, spawn_batch);

void livepatch_sysrq_handle_showstate_blocked(int key)
{
	schedule_work(&spawn_work);
}
