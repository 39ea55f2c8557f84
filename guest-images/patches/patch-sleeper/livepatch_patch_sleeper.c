// SPDX-License-Identifier: GPL-2.0
/*
 * Test helper: after this bundle is applied, SysRq 'n' starts a kernel thread whose whole
 * life is the bundle's own code (patch_sleeper_loop() sleeping a second at a time), so a
 * test can look at the stack of a task that sleeps inside a live patch: the host unwinds
 * it with the bundle's ORC rows, and disabling or replacing the bundle must wait for the
 * thread. SysRq 'n' again makes the thread leave (it returns, and the kthread exits).
 * The SysRq handler runs in the UART's interrupt, where nothing may sleep: it only sets a
 * flag or queues a work item, and a kworker starts the thread.
 */
#include <linux/kthread.h>
#include <linux/printk.h>
#include <linux/sched.h>
#include <linux/workqueue.h>
#include <linux/err.h>

static bool running, leave;

static noinline int patch_sleeper_loop(void *unused)
{
	pr_info("patch-sleeper: pid %d sleeps in the live patch\n", current->pid);
	while (!READ_ONCE(leave))
		schedule_timeout_interruptible(HZ);
	pr_info("patch-sleeper: pid %d leaves the live patch\n", current->pid);
	return 0;
}

static void start_sleeper(struct work_struct *work)
{
	struct task_struct *t = kthread_run(patch_sleeper_loop, NULL, "patch-sleeper");

	if (IS_ERR(t))
		pr_info("patch-sleeper: kthread_run failed (%ld)\n", PTR_ERR(t));
}

static DECLARE_WORK(sleeper_work, start_sleeper);

void livepatch_sysrq_handle_unrt(int key)
{
	if (READ_ONCE(running)) {
		WRITE_ONCE(leave, true);
		return;
	}
	WRITE_ONCE(running, true);
	schedule_work(&sleeper_work);
}
