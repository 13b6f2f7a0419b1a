"""The micro models, for the test files that still import them from here (test_registry_contract.py,
test_architectures.py, test_architecture_methods.py, test_groupwise_loading.py, test_peft_init.py):
testkit/micro.py builds them over quailora/supported_architectures.py's one list, which new code imports
directly. ``ARCHITECTURES`` is that list's config builders by name, derived from it, not a second list.
"""

from quailora.supported_architectures import SUPPORTED
from testkit.micro import make_micro_checkpoint, make_micro_config

ARCHITECTURES = {name: entry.build for name, entry in SUPPORTED.items()}

__all__ = ["ARCHITECTURES", "make_micro_checkpoint", "make_micro_config"]
