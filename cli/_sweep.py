"""How ``gradlab run`` executes the runs of one stage: child processes here, several at once
with ``--jobs N`` (a thread per running child, each only waiting for its process), or a
submitit job array (``--launcher slurm|submitit-local``). Both yield each run's result as it
ends; the experiment's table is in run order whatever the order of ending.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional


@dataclass
class Task:
    """One run to make: its number in the experiment, what it is (for the lines and the
    table), its command line, and the plan it comes from."""

    n: int
    what: str
    argv: list
    plan: object
    resumed: Optional[Path] = None


class LocalRunner:
    """Runs tasks as children of this process, ``jobs`` at once (:func:`gradlab.training.launch.
    job_environment` gives each its share of the CPU threads and its own GPU)."""

    def __init__(self, children, jobs: int = 1, fail_fast: bool = False):
        self.children, self.jobs, self.fail_fast = children, max(1, jobs), fail_fast
        self.stopped = False
        try:
            import torch

            self.gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except ImportError:  # pragma: no cover - torch is a dependency
            self.gpus = 0
        self._slots: "queue.Queue[int]" = queue.Queue()
        for i in range(self.jobs):
            self._slots.put(i)

    def stop(self) -> None:
        """Start no further task (those running finish)."""
        self.stopped = True

    def _one(self, task: Task, on_start: Callable[[Task], None]):
        from gradlab.training.launch import gradlab_command, job_environment, parse_child_output

        if self.stopped or self.children.received is not None:
            return None
        slot = self._slots.get()
        try:
            on_start(task)
            env = job_environment(slot, self.jobs, gpus=self.gpus)
            code, out, err = self.children.run(gradlab_command(task.argv), env=env)
        finally:
            self._slots.put(slot)
        result = parse_child_output(code, out, err)
        if self.fail_fast and result[0] != "completed":
            self.stopped = True  # here, not when the main thread reads it: no new start meanwhile
        return result

    def run(self, tasks: list, on_start: Callable[[Task], None]) -> Iterator[tuple]:
        """``(task, (status, path, error))`` for each task that ran, as each ends."""
        if self.jobs == 1:  # the plain sequential case: no threads at all
            for task in tasks:
                result = self._one(task, on_start)
                if result is not None:
                    yield task, result
            return
        lock = threading.Lock()

        def start(task):
            with lock:  # one start line at a time
                on_start(task)

        with ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="gradlab-run") as pool:
            pending = {pool.submit(self._one, t, start): t for t in tasks}
            while pending:
                # a timeout keeps the main thread returning to Python, where signal handlers run
                finished, _ = wait(list(pending), timeout=0.5, return_when=FIRST_COMPLETED)
                for fut in finished:
                    task = pending.pop(fut)
                    result = fut.result()
                    if result is not None:
                        yield task, result


class SubmititRunner:
    """Submits the tasks of a stage as one submitit job array and yields the results as the
    jobs end (or, with ``detach``, returns after writing the sweep record)."""

    def __init__(self, opts: dict, folder: Path, file: Path, detach: bool = False):
        from gradlab.training.launch import make_executor

        self.opts, self.folder, self.file, self.detach = opts, folder, file, detach
        self.executor = make_executor(folder, opts)
        self.stopped = False
        self.jobs: list = []
        self.submitted: list = []

    def stop(self) -> None:
        self.stopped = True

    def cancel(self) -> None:
        """Cancel the jobs of this stage that have not ended (on a signal while waiting)."""
        for job in self.jobs:
            try:
                if not job.done():
                    job.cancel(check=False)
            except Exception:  # a job that ended meanwhile, or a cluster that cannot be asked
                pass

    def run(self, tasks: list, on_start: Callable[[Task], None]) -> Iterator[tuple]:
        from gradlab.training.launch import run_gradlab, write_sweep_record

        if not tasks:
            return
        for task in tasks:
            on_start(task)
        self.jobs = self.executor.map_array(run_gradlab, [t.argv for t in tasks], [str(self.folder)] * len(tasks))
        self.submitted += [{"job_id": str(j.job_id), "what": t.what} for j, t in zip(self.jobs, tasks)]
        write_sweep_record(self.folder, self.file, self.opts["launcher"], self.submitted)
        if self.detach:
            return
        by_job = {id(j): t for j, t in zip(self.jobs, tasks)}
        import submitit

        for job in submitit.helpers.as_completed(self.jobs, poll_frequency=1):
            task = by_job[id(job)]
            try:
                r = job.result()
                yield task, (r["status"], r["path"], r["error"])
            except Exception as e:  # the job itself failed (killed, timed out, no node)
                line = str(e).strip().splitlines()
                yield task, ("failed", None, f"job {job.job_id}: {line[-1] if line else type(e).__name__}")


__all__ = ["LocalRunner", "SubmititRunner", "Task"]
