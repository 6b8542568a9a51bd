"""robint_ray: robust vs standard models, interpreted at scale on Ray.

Reproduces and scales Boychev (2023), "Interpretable Computer Vision Models through Adversarial
Training": PGD adversarial training, Integrated Gradients and SHAP expected gradients, representation
inversion, class-specific generation, feature visualisation, and FID, with Ray at the edges.
"""

import os
import sys

__version__ = "0.1.0"

# A local Ray instance keeps every socket on 127.0.0.1. Ray reads this setting once, when it is first
# imported, so it is made here, before anything imports ray. Joining a cluster ($RAY_ADDRESS, or the
# one `ray start` recorded on this machine, if it answers, at an address other than 127.0.0.1: the
# cluster distributed.init_ray joins, ray_address.running_cluster) leaves it alone, and so does
# ROBINT_LOOPBACK=0 (for a driver that will join a multi-node cluster by an explicit address).
from .ray_address import loopback_only, running_cluster

if loopback_only():
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Token authentication stated: the private Ray instance that init_ray starts has it on either way (Ray's
    # default for a new local instance, a token made in ~/.ray/auth_token if there is none), but where
    # RAY_AUTH_MODE is unset Ray warns that it turned it on, and that warning was the first line on stderr
    # of every local command. Ray reads the mode once, when it is imported: where Ray came first, the
    # setting would reach the instance's processes and not the driver, which then could not connect, so
    # it is made only before. A cluster this process joins (one `ray start` recorded on 127.0.0.1 included)
    # keeps its own setting.
    if "ray" not in sys.modules and running_cluster() is None:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
