"""DTensor's strategy registry as the sharding core reaches it, under the name the passes use."""
from seqpar_compiler.runtime.sharding.dtensor_bridge import *  # noqa: F401,F403
from seqpar_compiler.runtime.sharding.dtensor_bridge import __all__  # noqa: F401
