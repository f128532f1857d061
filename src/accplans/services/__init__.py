"""Long-running processes beside the RunEngine: the slow orbit feedback (and the archiver)."""

from ._archive import (
    ArchiveConfig,
    Archiver,
    ArchiverStats,
    ArchiveSignal,
    Spool,
    load_archive_config,
    query,
    run_archiver,
)
from ._cli import add_feedback_commands
from ._feedback import FeedbackService, FeedbackSettings, model_response_blocks
from ._process import FeedbackProcess, run_feedback

__all__ = [
    "ArchiveConfig",
    "ArchiveSignal",
    "Archiver",
    "ArchiverStats",
    "Spool",
    "load_archive_config",
    "query",
    "run_archiver",
    "FeedbackProcess",
    "FeedbackService",
    "FeedbackSettings",
    "add_feedback_commands",
    "model_response_blocks",
    "run_feedback",
]
