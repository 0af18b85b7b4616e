"""Ray orchestration of the invariance library: plan, execute, reduce, demo, finetune."""

import os

# A local Ray (no RAY_ADDRESS: the demo, a run on a laptop) stays on loopback. By default Ray
# swaps 127.0.0.1 for the machine's outward address and its servers listen on every interface.
# Ray reads this switch when it is imported, so it is set here, before any jobs module imports
# ray; a driver joining a cluster (RAY_ADDRESS set) keeps Ray's default.
if not os.environ.get("RAY_ADDRESS"):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # and keeps token auth, Ray's default for a new local Ray, said explicitly: Ray then does not
    # print "Token authentication is enabled for this Ray cluster..." on every run
    os.environ.setdefault("RAY_AUTH_MODE", "token")
