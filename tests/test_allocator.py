"""eqm.allocator: on glibc the process keeps the memory it frees, so a step that allocates the
same activations again reuses them instead of faulting their pages back in. Each case runs in a
fresh process: the setting is process-wide and cannot be undone."""

import platform
import subprocess
import sys

import pytest

from eqm.allocator import keep_freed_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

#: After one step (ten 8 MiB activations alive at once, then freed), print the bytes glibc holds
#: free in its heap (mallinfo2's fordblks), then the minor page faults per step of 30 more steps.
_WORK = """
import ctypes, resource, sys, torch
from eqm.allocator import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] == "kept":
    assert keep_freed_memory() and keep_freed_memory()  # applies, and a second call is a no-op
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():
    xs = [torch.ones(2 << 20) for _ in range(10)]
    del xs
step()
held = libc.mallinfo2().fordblks
f0 = faults()
for _ in range(30):
    step()
print(held, (faults() - f0) / 30)
"""
STEP_BYTES = 10 * (8 << 20)
PAGE = 4096


def _run(mode: str) -> tuple[int, float]:
    out = subprocess.run([sys.executable, "-c", _WORK, mode], check=True, capture_output=True, text=True).stdout
    held, faults = out.split()[-2:]
    return int(held), float(faults)


@pytest.mark.skipif(not GLIBC, reason="glibc only (mallinfo2: glibc 2.33+)")
def test_freed_activations_stay_in_the_heap_and_are_reused_without_page_faults():
    held, faults = _run("kept")
    assert held >= STEP_BYTES  # every freed block kept for the next step
    assert faults < STEP_BYTES / PAGE / 4, faults  # the next steps reuse them: few of their pages fault
    default_held, _ = _run("default")
    assert default_held < STEP_BYTES  # glibc's defaults hand them back to the kernel


def test_it_says_whether_it_applies():
    assert keep_freed_memory() is GLIBC
