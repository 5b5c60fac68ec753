"""Run records: the run-folder contract (:mod:`.folder`), what a run logs (:mod:`.logging`),
checkpoints (:mod:`.checkpoints`), finding runs (:mod:`.records`) and the runs table
(:mod:`.table`). Stock I/O only: ``csv``, ``torch.utils.tensorboard``, ``torch.save``/``load``.

This layer knows no model, dataset or optimizer; rebuilding a trained model from a run is
:func:`gradlab.training.load.load_run`.
"""

from gradlab.runs.checkpoints import load_checkpoint, save_checkpoint
from gradlab.runs.folder import METRIC_COLUMNS, STATUSES, RunDir, validate_run_name
from gradlab.runs.records import RunFolderError, find_run, list_runs, read_config

__all__ = ["RunDir", "METRIC_COLUMNS", "STATUSES", "validate_run_name", "find_run", "list_runs", "read_config",
           "RunFolderError", "load_checkpoint", "save_checkpoint"]
