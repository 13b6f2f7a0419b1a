"""Every Ray worker of a quailora job knows its own cluster's address.

Why: Ray Train's PlacementGroupCleaner (a detached actor that removes a Train run's placement group when its
controller dies) asks the State API whether the controller is alive, and the State API finds its cluster
through RAY_ADDRESS, else by scanning this host's Ray processes, failing with "Found multiple active Ray
instances" where several run on one host (a workstation running two sweeps, a test beside a cluster). Set
as the job's ``worker_process_setup_hook`` (trials.run.ensure_ray), this runs first in every worker.
"""

from __future__ import annotations

import os

import ray


def export_own_address() -> None:
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
