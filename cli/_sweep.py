"""How ``gradlab run`` executes the runs of one stage: child processes here, several at once
with ``--jobs N`` (a thread per running child, each only waiting for its process), or a
submitit job array (``--launcher slurm|submitit-local``). Both yield each run's result as it
ends; the experiment's table is in run order whatever the order of ending.
"""

from __future__ import annotations

import os
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
        self.base_env: Optional[dict] = None  # the children's environment (None: this process's)
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
            env = job_environment(slot, self.jobs, self.base_env, gpus=self.gpus)
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


#: What torchrun tells its workers; a sweep's children are single processes and must not see it
#: (each would try to join a process group of its own with the other ranks' children).
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                 "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


def single_process_env(environ: dict, local_rank: int, gpus: int) -> dict:
    """``environ`` without torchrun's variables; with several GPUs and no CUDA_VISIBLE_DEVICES
    of the user's, this rank's children see only the GPU of its local rank.

    >>> single_process_env({"RANK": "1", "TORCHELASTIC_RUN_ID": "x", "HOME": "/h"}, 1, 4)
    {'HOME': '/h', 'CUDA_VISIBLE_DEVICES': '1'}
    """
    env = {k: v for k, v in environ.items() if k not in TORCHRUN_VARS and not k.startswith("TORCHELASTIC_")}
    if gpus > 1 and "CUDA_VISIBLE_DEVICES" not in environ:
        env["CUDA_VISIBLE_DEVICES"] = str(local_rank % gpus)
    return env


class RankRunner:
    """``gradlab run`` under torchrun: the ranks share each stage's runs, rank ``r`` making runs
    ``r, r + W, ...`` of the stage through its own :class:`LocalRunner` (``--jobs`` at once), each
    run a single-process child. At the stage's end the ranks exchange their results (one
    ``all_gather_object``), so every rank yields every run's result in run order, the next stage
    sees all of them, and a stop on one rank (--fail-fast, a signal) stops all at the stage's end."""

    def __init__(self, inner: LocalRunner, info):
        self.inner, self.info = inner, info
        self.interrupted: Optional[int] = None  # a signal that stopped some rank's runs
        inner.base_env = single_process_env(dict(os.environ), info.local_rank, inner.gpus)

    @property
    def stopped(self) -> bool:
        return self.inner.stopped

    def stop(self) -> None:
        self.inner.stop()

    def run(self, tasks: list, on_start: Callable[[Task], None]) -> Iterator[tuple]:
        from gradlab.core.distributed import gather_objects

        mine = tasks[self.info.rank::self.info.world_size]
        done = [(t.n, r) for t, r in self.inner.run(mine, on_start)]
        parts = gather_objects((done, self.inner.stopped, self.inner.children.received), self.info)
        self.interrupted = next((sig for _, _, sig in parts if sig is not None), None)
        if any(stopped for _, stopped, _ in parts) or self.interrupted is not None:
            self.inner.stopped = True
        by_n = {t.n: t for t in tasks}
        for n, result in sorted((item for part, _, _ in parts for item in part), key=lambda item: item[0]):
            yield by_n[n], result


__all__ = ["LocalRunner", "RankRunner", "SubmititRunner", "Task", "single_process_env"]
