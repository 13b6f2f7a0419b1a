import os
import tempfile

# No hub anywhere: every test runs offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The CLI's routed third-party log records (orchestrator/log_routing.py) stay out of ~/.cache.
os.environ.setdefault(
    "QUAILORA_LOG_FILE", os.path.join(tempfile.mkdtemp(prefix="quailora-test-logs-"), "cli.log")
)
