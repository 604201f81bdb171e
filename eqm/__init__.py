"""eqm: Equilibrium Matching video models that know real time.

Everything that computes lives here; the `eqmctl` package is only the command line over it.
Every public function is usable from Python with no CLI involved.
"""

__version__ = "0.1.0"
