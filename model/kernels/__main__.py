"""`python -m model.kernels`: build our CPU kernels into the cache now (the CPU image does, at build time)
and print the instruction set they run with; exit status 1 where they do not build."""

import sys

from model.kernels import load

isa = load()
print(isa or "our kernels are not available: torch's run")
sys.exit(0 if isa else 1)
