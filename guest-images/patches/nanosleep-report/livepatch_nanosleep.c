// SPDX-License-Identifier: GPL-2.0
/*
 * A kernel function that user space sleeps in: every relative or absolute nanosleep()
 * and clock_nanosleep() of an hrtimer clock waits inside hrtimer_nanosleep(). The
 * replacement sleeps the same way (same slack rule, same restart after a signal) and
 * says in the kernel log, for the first calls that run it, which process sleeps in the
 * new code. A test keeps a `sleep` process inside the original while the patch is
 * applied: the transition waits for that task, names it with its stack, and completes
 * once it has left.
 */
#include <linux/atomic.h>
#include <linux/hrtimer.h>
#include <linux/printk.h>
#include <linux/sched.h>
#include <linux/sched/deadline.h>
#include <linux/sched/rt.h>

/* Static functions of kernel/time/hrtimer.c, found in the guest's kallsyms. */
int do_nanosleep(struct hrtimer_sleeper *t, enum hrtimer_mode mode);
long hrtimer_nanosleep_restart(struct restart_block *restart);

#define REPORTS 64

static atomic_t calls;

long livepatch_hrtimer_nanosleep(ktime_t rqtp, const enum hrtimer_mode mode,
				 const clockid_t clockid)
{
	struct hrtimer_sleeper sleeper;
	u64 slack = current->timer_slack_ns;
	long ret;

	if (atomic_inc_return(&calls) <= REPORTS)
		pr_info("nanosleep-report: pid %d (%s) sleeps in the patched hrtimer_nanosleep\n",
			task_pid_nr(current), current->comm);

	/* Real-time and deadline tasks get no slack. */
	if (dl_task(current) || rt_task(current))
		slack = 0;
	hrtimer_init_sleeper_on_stack(&sleeper, clockid, mode);
	hrtimer_set_expires_range_ns(&sleeper.timer, rqtp, slack);
	ret = do_nanosleep(&sleeper, mode);
	if (ret == -ERESTART_RESTARTBLOCK) {
		if (mode == HRTIMER_MODE_ABS) {
			/* An absolute sleep restarts with the caller's own arguments. */
			ret = -ERESTARTNOHAND;
		} else {
			/* A relative one resumes towards the same expiry. */
			struct restart_block *restart = &current->restart_block;

			restart->nanosleep.clockid = sleeper.timer.base->clockid;
			restart->nanosleep.expires = hrtimer_get_expires_tv64(&sleeper.timer);
			set_restart_fn(restart, hrtimer_nanosleep_restart);
		}
	}
	destroy_hrtimer_on_stack(&sleeper.timer);
	return ret;
}
