"""The placements of the sharding core, under the name the graph passes import them by."""
from seqpar_compiler.runtime.sharding.placements import *  # noqa: F401,F403
from seqpar_compiler.runtime.sharding.placements import __all__  # noqa: F401
