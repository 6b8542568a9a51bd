"""robint_ray: robust vs standard models, interpreted at scale on Ray.

Reproduces and scales Boychev (2023), "Interpretable Computer Vision Models through Adversarial
Training": PGD adversarial training, Integrated Gradients and SHAP expected gradients, representation
inversion, class-specific generation, feature visualisation, and FID, with Ray at the edges.
"""

import os

__version__ = "0.1.0"

# A local Ray instance keeps every socket on 127.0.0.1. Ray reads this setting once, when it is first
# imported, so it is made here, before anything imports ray. Joining a cluster ($RAY_ADDRESS, as set by
# `ray job submit`, or one that `ray start` recorded on this machine at an address other than
# 127.0.0.1: distributed.init_ray joins it) leaves it alone, and so does ROBINT_LOOPBACK=0 (for a driver
# that will join a multi-node cluster by an explicit address).
from .distributed import recorded_cluster as _recorded_cluster

_recorded = _recorded_cluster()
_cluster_here = _recorded is not None and not _recorded.startswith("127.0.0.1:")
if not os.environ.get("RAY_ADDRESS") and os.environ.get("ROBINT_LOOPBACK", "1") != "0" and not _cluster_here:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
