// SPDX-License-Identifier: GPL-2.0
/*
 * The host-side translation of the kernel's test_klp_state / test_klp_state2 selftest
 * modules: they replace no function, and the callbacks that save console_loglevel, change
 * it and restore it become state actions in the manifests (the host writes
 * console_printk[0], which console_loglevel names, inside the transition's pause).
 * A bundle carries an object, so this file gives it an empty one.
 */
#include <linux/printk.h>
