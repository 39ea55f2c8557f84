#!/usr/bin/env python3
"""Boot the guest images under QEMU (microvm, TCG) and drive the serial shell.

Usage: guest-images/qemu-smoke.py [IMAGE_DIR] [--mbr] [--timeout S] [--log FILE]
                                  [--tsc-khz KHZ] [--append ARGS]

Boots IMAGE_DIR/vmlinuz + IMAGE_DIR/initrd.img with IMAGE_DIR/guest.img
(or guest-mbr.img with root=/dev/vda1 when --mbr) as a virtio-mmio disk,
waits for the VMM-GUEST-READY line, runs a few commands through the serial
console (a pipe on QEMU's stdin), checks their output, powers off and checks
that QEMU exits. Prints the wall time from QEMU start to the readiness line.

The kernel command line gets tsc_early_khz=<host TSC kHz>: under TCG the
microvm machine offers no HPET, PM timer or usable PIT calibration, and the
Debian kernel then spins forever calibrating the LAPIC timer against jiffies.
Exit status 0 on success.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import threading
import time

READY = b"VMM-GUEST-READY"


class Console:
    """Collects QEMU's stdout in a background thread."""

    def __init__(self, proc, log):
        self.proc = proc
        self.log = log
        self.buf = bytearray()
        self.cond = threading.Condition()
        self.eof = False
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self):
        fd = self.proc.stdout.fileno()
        while True:
            chunk = os.read(fd, 4096)
            if self.log:
                self.log.write(chunk)
                self.log.flush()
            with self.cond:
                if not chunk:
                    self.eof = True
                else:
                    self.buf += chunk
                self.cond.notify_all()
            if not chunk:
                return

    def wait_for(self, pattern, start, deadline):
        """Wait until regex `pattern` (bytes) matches buf[start:]; return the match."""
        rx = re.compile(pattern)
        with self.cond:
            while True:
                m = rx.search(self.buf, start)
                if m:
                    return m
                left = deadline - time.monotonic()
                if self.eof or left <= 0:
                    return None
                self.cond.wait(min(left, 0.5))

    def send(self, line):
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()


def host_tsc_khz():
    """Under TCG the guest TSC ticks at the host TSC rate; estimate it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        pass
    return 2000000


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image_dir", nargs="?", default=os.path.join(here, "out"))
    ap.add_argument("--mbr", action="store_true", help="boot guest-mbr.img, root=/dev/vda1")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for readiness")
    ap.add_argument("--smp", type=int, default=2)
    ap.add_argument("--log", help="write the raw console output to this file")
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--tsc-khz", type=int, default=None,
                    help="tsc_early_khz= for the guest (default: host TSC rate from "
                         "/proc/cpuinfo; 0 to omit). Needed under TCG: microvm has no "
                         "HPET/PM timer, so the kernel cannot calibrate the TSC and "
                         "hangs calibrating the LAPIC timer without it")
    ap.add_argument("--append", default="", help="extra kernel command line")
    args = ap.parse_args()

    d = args.image_dir
    disk = os.path.join(d, "guest-mbr.img" if args.mbr else "guest.img")
    root = "/dev/vda1" if args.mbr else "/dev/vda"
    for f in ("vmlinuz", "initrd.img", os.path.basename(disk)):
        if not os.path.isfile(os.path.join(d, f)):
            sys.exit(f"error: {os.path.join(d, f)} missing (run guest-images/build.sh)")
    if not shutil.which(args.qemu):
        sys.exit(f"error: {args.qemu} not found (apt-get install qemu-system-x86)")

    cmdline = f"console=ttyS0 root={root} rw panic=-1"
    tsc_khz = host_tsc_khz() if args.tsc_khz is None else args.tsc_khz
    if tsc_khz:
        cmdline += f" tsc_early_khz={tsc_khz}"
    if args.append:
        cmdline += " " + args.append
    cmd = [
        args.qemu, "-M", "microvm,acpi=on,rtc=on", "-accel", "tcg", "-cpu", "max",
        "-smp", str(args.smp), "-m", "512", "-nographic", "-no-reboot",
        "-kernel", os.path.join(d, "vmlinuz"),
        "-initrd", os.path.join(d, "initrd.img"),
        "-append", cmdline,
        # snapshot=on: the smoke test never modifies the image on disk.
        "-drive", f"id=d0,file={disk},format=raw,if=none,snapshot=on",
        "-device", "virtio-blk-device,drive=d0",
    ]
    log = open(args.log, "wb") if args.log else None
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    con = Console(proc, log)
    failures = []

    def fail(msg):
        failures.append(msg)
        print(f"FAIL: {msg}", file=sys.stderr)

    try:
        m = con.wait_for(rb"(?m)^VMM-GUEST-READY\r?$", 0, t0 + args.timeout)
        if not m:
            tail = bytes(con.buf[-2000:]).decode(errors="replace")
            fail(f"no {READY.decode()} within {args.timeout:.0f} s; console tail:\n{tail}")
            return 1
        t_ready = time.monotonic() - t0
        print(f"ready: {READY.decode()} after {t_ready:.2f} s (wall, from QEMU start)")
        pos = m.end()

        def run(shell_cmd, n):
            """Run a command; return its output (between echo and end marker)."""
            nonlocal pos
            # The marker is computed by the shell, so the echoed input line
            # (which shows "$((...))") never matches it.
            deadline = time.monotonic() + 60
            # Send only at a prompt: type-ahead would be echoed twice (once by
            # the tty in cooked mode, once by the shell's line editor).
            prompt = con.wait_for(rb"guest# ", pos, deadline)
            if not prompt:
                fail(f"no shell prompt before {shell_cmd!r}")
                return ""
            line = f"{shell_cmd}; echo END-$(({n}+1000))-MARK"
            con.send(line)
            echo = con.wait_for(re.escape(line.encode()) + rb"[^\n]*\n", prompt.end(), deadline)
            end = echo and con.wait_for(rb"END-%d-MARK" % (n + 1000), echo.end(), deadline)
            if not end:
                fail(f"command {shell_cmd!r} did not complete")
                return ""
            out = bytes(con.buf[echo.end():end.start()]).decode(errors="replace")
            pos = end.end()
            return out.replace("\r", "")

        out = run("cat /proc/cmdline", 1)
        print(f"cmdline: {out.strip()}")
        if cmdline not in out:
            fail(f"/proc/cmdline does not contain {cmdline!r}")
        out = run("nproc", 2)
        print(f"nproc: {out.strip()}")
        if out.split() != [str(args.smp)]:
            fail(f"nproc is not {args.smp}")
        out = run("mount", 3)
        print("mount:\n  " + "\n  ".join(out.strip().splitlines()))
        if not re.search(rf"^{re.escape(root)} on / type ext4 \(rw", out, re.M):
            fail(f"{root} is not mounted read-write on / as ext4")
        if not con.wait_for(rb"guest# ", pos, time.monotonic() + 60):
            fail("no shell prompt before poweroff")
        t_off = time.monotonic()
        con.send("poweroff")
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            fail("QEMU did not exit within 60 s of poweroff")
            return 1
        print(f"poweroff: QEMU exited with status {rc} after {time.monotonic() - t_off:.2f} s")
        if rc != 0:
            fail(f"QEMU exit status {rc}")
        return 1 if failures else 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        total = time.monotonic() - t0
        print(f"{'PASS' if not failures else 'FAILED'} (total {total:.2f} s)")
        if log:
            log.close()


if __name__ == "__main__":
    sys.exit(main())
