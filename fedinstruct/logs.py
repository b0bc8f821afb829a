"""One logging setup for the CLI, the ServerApp and the ClientApp processes."""

from __future__ import annotations

import logging
import os
import warnings


def setup_logging(level: int = logging.INFO) -> None:
    """fedinstruct's own INFO lines; library chatter at WARNING."""
    logger = logging.getLogger("fedinstruct")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter("%(asctime)s fedinstruct %(levelname)s %(message)s", "%H:%M:%S")
        )
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")
