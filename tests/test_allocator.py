"""eqm.allocator: on glibc the process keeps the memory it frees, so a step that allocates the
same activations again does not fault their pages back in. Each case runs in a fresh process:
the setting is process-wide and cannot be undone."""

import platform
import subprocess
import sys

import pytest

from eqm.allocator import keep_freed_memory

_WORK = """
import resource, sys, torch
from eqm.allocator import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory() and keep_freed_memory()  # applies, and a second call is a no-op
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():  # activations of a few MiB each, allocated together and freed, as in a training step
    xs = [torch.ones(n << 18) for n in (4, 8, 12, 16, 20)]
    del xs
step()
f0 = faults()
for _ in range(30):
    step()
print(faults() - f0)
"""

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _WORK, mode], check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1])


@glibc
def test_kept_memory_is_reused_without_page_faults():
    default, kept = _faults("default"), _faults("kept")
    assert kept * 2 < default, (default, kept)


def test_it_says_whether_it_applies():
    applies = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is applies
